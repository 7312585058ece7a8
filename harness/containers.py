"""Building and running OCI images with podman on a machine without a container daemon
and without a reachable registry.

- podman, runc and debootstrap come from Debian's packages (harness.system.require_program).
- Every podman call gets this suite's own containers configuration through CONTAINERS_CONF;
  the machine's configuration is never changed. As root without a daemon, crun (podman's
  default runtime) fails here on setrlimit and on cgroups in hybrid mode: the configuration
  selects runc and drops the default ulimits.
- Podman 4.3 runs an image's HEALTHCHECK with systemd timers and logs errors on every run
  where systemd is not PID 1; DISABLE_HC_SYSTEMD=true turns the timers off. `podman
  healthcheck run` still runs a check on demand.
- No registry answers, so the Python base image is a local stand-in (python_base_image()):
  a minimal Debian bookworm from the machine's Debian mirror, with Debian's python3 and the
  machine's CA bundle, so that builds on it reach the package index through this machine's
  TLS-inspecting proxy with no change to the Dockerfile. It is built once and cached under
  a tag that changes with its recipe and the CA bundle; parallel pytest-xdist workers wait
  for one another on a lock file.
- Builds and containers use the host's network (`--network host`).

Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from .system import require_program

STATE_DIR = Path("/tmp/template-suite-containers")
CONTAINERS_CONF_TEXT = """\
# Written by the template's test harness; used through CONTAINERS_CONF only.
[containers]
# Raising RLIMIT_NOFILE/NPROC is not permitted in this machine's sandbox.
default_ulimits = []

[engine]
# crun fails on this machine's cgroups ("cgroups in hybrid mode"); runc works.
runtime = "runc"
"""
BASE_LOCK_PATH = Path("/tmp/template-suite-containers-base.lock")
BASE_LOCK_TIMEOUT = 900.0
DEBIAN_SUITE = "bookworm"
DEBOOTSTRAP_TIMEOUT = 600.0
IMPORT_TIMEOUT = 300.0
BUILD_TIMEOUT = 600.0
PODMAN_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
BUILD_LABEL = "template-suite.build"
STANDIN_PACKAGES = (
    "python3",
    "python3-venv",
    "python3-pip",
    "python-is-python3",
    "ca-certificates",
)
# Where the stand-in keeps the host's CA bundle.
STANDIN_CA_PATH = "/usr/local/share/ca-certificates-host/ca-bundle.crt"
STANDIN_CONTAINERFILE = f"""\
FROM {{debian_image}}
RUN apt-get update \\
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
       {" ".join(STANDIN_PACKAGES)} \\
    && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
COPY ca-bundle.crt {STANDIN_CA_PATH}
ENV SSL_CERT_FILE={STANDIN_CA_PATH} PIP_CERT={STANDIN_CA_PATH}
"""


class ContainerError(RuntimeError):
    pass


# -- podman ------------------------------------------------------------------------------


def require_podman() -> str:
    """The podman program, with runc; installed from Debian's packages when missing and run
    as root, otherwise a MissingProgramError that says how to install them."""
    podman_path = require_program("podman", "podman", "runc")
    require_program("runc")
    return podman_path


def containers_conf() -> Path:
    """This suite's containers configuration, written (atomically) when missing or stale."""
    path = STATE_DIR / "containers.conf"
    if not path.exists() or path.read_text() != CONTAINERS_CONF_TEXT:
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"containers.conf.{os.getpid()}")
        tmp.write_text(CONTAINERS_CONF_TEXT)
        tmp.replace(path)
    return path


def podman_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(containers_conf()), "DISABLE_HC_SYSTEMD": "true"}


def podman(
    *args: str,
    timeout: float = PODMAN_TIMEOUT,
    check: bool = True,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `podman ARGS` with this suite's configuration; raise ContainerError on a non-zero
    exit when `check`, and on a timeout."""
    cmd = [require_podman(), *args]
    try:
        result = subprocess.run(
            cmd,
            env=podman_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise ContainerError(f"podman {' '.join(args)} did not finish in {timeout}s") from exc
    if check and result.returncode != 0:
        raise ContainerError(
            f"podman {' '.join(args)} exited with {result.returncode}:\n"
            f"{(result.stdout + result.stderr)[-6000:]}"
        )
    return result


def image_exists(tag: str) -> bool:
    return podman("image", "exists", tag, check=False).returncode == 0


def image_inspect(tag: str) -> dict[str, Any]:
    data: list[dict[str, Any]] = json.loads(podman("image", "inspect", tag).stdout)
    return data[0]


def image_size(tag: str) -> int:
    """The image's size in bytes, base layers included."""
    return int(image_inspect(tag)["Size"])


def remove_image(tag: str) -> None:
    """Remove the image and every intermediate image of its builds (build_image labels
    them with the tag: removing the tag alone leaves the build stage's layers behind);
    never fails: what cannot be removed is reported as a warning. Not beside another podman
    build or removal: the image store is not safe for that (tests/test_image.py runs its
    cases on one worker)."""
    error = ""
    with contextlib.suppress(ContainerError):
        podman("rmi", "--force", tag, check=False, timeout=120)
        label = f"label={BUILD_LABEL}={tag}"
        ids = list(
            dict.fromkeys(podman("images", "--all", "--quiet", "--filter", label).stdout.split())
        )
        if ids:
            error = podman("rmi", "--force", *ids, check=False, timeout=120).stderr
        if not podman("images", "--all", "--quiet", "--filter", label).stdout.split():
            return
    warnings.warn(f"images of {tag} were left behind: {error[-1000:]}", stacklevel=2)


def build_image(
    context: Path,
    tag: str,
    build_args: Mapping[str, str] | None = None,
    timeout: float = BUILD_TIMEOUT,
) -> tuple[float, str]:
    """Build `context`'s Dockerfile as `tag`; return the seconds it took and the build log.

    Docker's image format keeps HEALTHCHECK (the OCI format has no field for it), and the
    host's network reaches the package index. Every image of the build, the intermediate
    ones included, carries the label BUILD_LABEL=`tag`, for remove_image()."""
    args = ["build", "--network", "host", "--format", "docker", "--tag", tag]
    args += ["--label", f"{BUILD_LABEL}={tag}"]
    for name, value in (build_args or {}).items():
        args += ["--build-arg", f"{name}={value}"]
    started = time.monotonic()
    result = podman(*args, str(context), timeout=timeout, check=False)
    elapsed = time.monotonic() - started
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise ContainerError(f"podman build of {context} failed:\n{log[-8000:]}")
    return elapsed, log


def private_base(base: str, tag: str) -> str:
    """A copy of the image `base` (a new image ID, the same layers) that only the builds of
    `tag` use, removed with it by remove_image(`tag`).

    The layer cache is keyed by the parent image's ID: builds of different services on one
    shared base start equal steps (uv's install) from whichever copy of those layers was
    built first, and builds in parallel make several copies; a later build then picks one
    copy for a step and misses its own next steps. On a private base, a first build runs
    every step and a second build of the same context finds every step in the cache."""
    private = f"{tag}-base"
    with tempfile.TemporaryDirectory(prefix="private-base-", dir="/tmp") as tmp:
        (Path(tmp) / "Containerfile").write_text(f"FROM {base}\n")
        podman("build", "--tag", private, "--label", f"{BUILD_LABEL}={tag}", tmp)
    return private


def run_once(
    image: str,
    *command: str,
    env: Mapping[str, str] | None = None,
    volumes: Mapping[str, str] | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """`podman run --rm` on the host's network (`volumes`: volume name -> path in the
    container); the completed process, whatever its exit."""
    return podman(
        "run", "--rm", "--network", "host", *_env_args(env), *_volume_args(volumes), image,
        *command, timeout=timeout, check=False,
    )  # fmt: skip


def _env_args(env: Mapping[str, str] | None) -> list[str]:
    return [arg for name, value in (env or {}).items() for arg in ("--env", f"{name}={value}")]


def _volume_args(volumes: Mapping[str, str] | None) -> list[str]:
    return [arg for name, path in (volumes or {}).items() for arg in ("--volume", f"{name}:{path}")]


@contextlib.contextmanager
def volume() -> Iterator[str]:
    """A new named volume, removed afterwards: yields its name. Mounted on a directory of
    an image for the first time, it starts with that directory's files and owner."""
    name = f"template-suite-{uuid.uuid4().hex[:12]}"
    podman("volume", "create", name)
    try:
        yield name
    finally:
        podman("volume", "rm", "--force", name, check=False)


class Container:
    """A detached container on the host's network, removed on exit from the `with` block."""

    def __init__(
        self,
        image: str,
        *command: str,
        env: Mapping[str, str] | None = None,
        volumes: Mapping[str, str] | None = None,
        name: str = "",
    ) -> None:
        self.image = image
        self.command = command
        self.env = dict(env or {})
        self.volumes = dict(volumes or {})  # volume name -> path in the container
        self.name = name or f"template-suite-{uuid.uuid4().hex[:12]}"
        self.started = False

    def start(self) -> Container:
        self.started = True  # a failed `run` may still leave a container to remove
        try:
            podman(
                "run", "--detach", "--name", self.name, "--network", "host",
                *_env_args(self.env), *_volume_args(self.volumes), self.image, *self.command,
            )  # fmt: skip
        except BaseException:
            self.remove()
            raise
        return self

    def state(self) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(podman("container", "inspect", self.name).stdout)
        return dict(data[0]["State"])

    def running(self) -> bool:
        return bool(self.state()["Running"])

    def logs(self) -> str:
        result = podman("logs", self.name, check=False)
        return result.stdout + result.stderr

    def exec(self, *command: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return podman("exec", self.name, *command, timeout=timeout, check=False)

    def kill(self, signal: str = "TERM") -> None:
        podman("kill", "--signal", signal, self.name)

    def stop(self, timeout: float) -> int:
        """`podman stop`, as `docker stop` does: SIGTERM, and SIGKILL after `timeout` seconds;
        the exit code, once the container has stopped."""
        podman("stop", "--time", str(int(timeout)), self.name, timeout=timeout + PODMAN_TIMEOUT)
        return self.wait(PODMAN_TIMEOUT)

    def wait(self, timeout: float) -> int:
        """The exit code, once the container has stopped; ContainerError after `timeout`."""
        result = podman("wait", self.name, timeout=timeout)
        return int(result.stdout.strip().splitlines()[-1])

    def remove(self) -> None:
        # --time 0: podman 4.3's `rm --force` otherwise sends SIGTERM and waits 10 s.
        if self.started:
            podman("rm", "--force", "--time", "0", self.name, check=False, timeout=STOP_TIMEOUT)
            self.started = False

    def __enter__(self) -> Container:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.remove()


# -- the stand-in Python base image ----------------------------------------------------------


def debian_mirror() -> str:
    """The Debian archive this machine's apt uses for `DEBIAN_SUITE`, from
    /etc/apt/sources.list and /etc/apt/sources.list.d/*.list and *.sources."""
    files = [Path("/etc/apt/sources.list")]
    directory = Path("/etc/apt/sources.list.d")
    if directory.is_dir():
        files += sorted(p for p in directory.iterdir() if p.suffix in {".list", ".sources"})
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {
                    key.strip().lower(): value.strip()
                    for key, value in re.findall(r"^([A-Za-z-]+):(.*)$", stanza, re.M)
                }
                enabled = fields.get("enabled", "yes").lower() != "no"
                if (
                    enabled
                    and "deb" in fields.get("types", "").split()
                    and DEBIAN_SUITE in fields.get("suites", "").split()
                    and fields.get("uris")
                ):
                    return fields["uris"].split()[0]
        else:
            for line in text.splitlines():
                match = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
                if match and match.group(2) == DEBIAN_SUITE:
                    return match.group(1)
    raise ContainerError(
        f"no Debian {DEBIAN_SUITE} archive in /etc/apt/sources.list*: the stand-in base image "
        "is bootstrapped from it"
    )


def host_ca_bundle() -> Path:
    """The CA bundle the host's TLS clients trust: SSL_CERT_FILE, else Debian's."""
    path = Path(os.environ.get("SSL_CERT_FILE") or "/etc/ssl/certs/ca-certificates.crt")
    if not path.is_file():
        raise ContainerError(f"no CA bundle at {path} (SSL_CERT_FILE) to give the stand-in image")
    return path


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float) -> Iterator[None]:
    """An exclusive flock on `path`, waited for at most `timeout` seconds."""
    with path.open("a") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() > deadline:
                    raise ContainerError(f"{path} stayed locked for {timeout}s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(hashlib.sha256(part).digest())
    return h.hexdigest()[:16]


def _debian_image(mirror: str) -> str:
    """A minimal Debian `DEBIAN_SUITE` imported from debootstrap; built when missing."""
    tag = "localhost/template-suite-debian:" + _digest(
        DEBIAN_SUITE.encode(), mirror.encode(), b"--variant=minbase"
    )
    if image_exists(tag):
        return tag
    debootstrap = require_program("debootstrap")
    with tempfile.TemporaryDirectory(prefix="debootstrap-", dir="/var/tmp") as tmp:
        root = Path(tmp) / "root"
        try:
            result = subprocess.run(
                [debootstrap, "--variant=minbase", DEBIAN_SUITE, str(root), mirror],
                capture_output=True,
                text=True,
                timeout=DEBOOTSTRAP_TIMEOUT,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise ContainerError(f"debootstrap did not finish in {DEBOOTSTRAP_TIMEOUT}s") from exc
        if result.returncode != 0:
            raise ContainerError(
                f"debootstrap {DEBIAN_SUITE} from {mirror} failed:\n"
                f"{(result.stdout + result.stderr)[-4000:]}"
            )
        # The archive as a file: `podman import` reads it once, with a bounded wait.
        archive = Path(tmp) / "root.tar"
        tar = subprocess.run(
            ["tar", "-C", str(root), "--numeric-owner", "-cf", str(archive), "."],
            capture_output=True,
            text=True,
            timeout=IMPORT_TIMEOUT,
        )
        if tar.returncode != 0:
            raise ContainerError(f"tar of the bootstrapped tree failed:\n{tar.stderr[-4000:]}")
        podman("import", str(archive), tag, timeout=IMPORT_TIMEOUT)
    return tag


def python_base_image() -> str:
    """The tag of the local stand-in for `python:3.11-slim`: Debian bookworm's python3 (3.11)
    with venv and pip, and the host's CA bundle as SSL_CERT_FILE and PIP_CERT. Built on
    first use and reused while its recipe and the CA bundle stay the same."""
    require_podman()
    mirror = debian_mirror()
    ca_bundle = host_ca_bundle().read_bytes()
    tag = "localhost/template-suite-python:" + _digest(
        STANDIN_CONTAINERFILE.encode(), mirror.encode(), ca_bundle
    )
    if image_exists(tag):
        return tag
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with _file_lock(BASE_LOCK_PATH, BASE_LOCK_TIMEOUT):
        # Another worker may have built it while this one waited.
        if image_exists(tag):
            return tag
        debian = _debian_image(mirror)
        with tempfile.TemporaryDirectory(prefix="python-base-", dir=STATE_DIR) as tmp:
            context = Path(tmp)
            (context / "Containerfile").write_text(
                STANDIN_CONTAINERFILE.format(debian_image=debian)
            )
            shutil.copyfile(host_ca_bundle(), context / "ca-bundle.crt")
            podman(
                "build", "--network", "host", "--tag", tag,
                "--file", str(context / "Containerfile"), str(context),
                timeout=BUILD_TIMEOUT,
            )  # fmt: skip
    return tag
