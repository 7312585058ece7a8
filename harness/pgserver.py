"""A PostgreSQL server for the suite: TEST_DATABASE_URL if something answers there,
otherwise a throwaway cluster in a temporary directory, otherwise a clear failure."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict
from urllib.parse import quote, urlsplit

from .system import require_program

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
# WAL senders (and replication slots) of a cluster made with `replication=True`.
MAX_WAL_SENDERS = 5
HOW_TO_PROVIDE = (
    "Set TEST_DATABASE_URL to a PostgreSQL server where user may create databases "
    "(e.g. postgresql://postgres@127.0.0.1:5432/postgres), or install the PostgreSQL "
    "server binaries (Debian: apt-get install postgresql) so the suite can start its own."
)


class NoServerError(RuntimeError):
    pass


def answers(url: str, timeout: float = 2.0) -> bool:
    """Something accepts TCP connections at the URL's host and port."""
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), timeout):
            return True
    except OSError:
        return False


def find_bindir() -> Path | None:
    """The directory holding initdb and pg_ctl, newest version first."""
    candidates: list[Path] = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    candidates += [
        Path(p).parent for p in sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    ]
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: a certificate authority of its own, and a server certificate it signed for
    127.0.0.1 and localhost, with its key."""

    ca: Path
    certificate: Path
    key: Path


# A CA certificate: may sign certificates, nothing else.
CA_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
x509_extensions = ca
[dn]
CN = {name}
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
"""
# A server certificate for the loopback address, as verify-full checks it.
SERVER_EXTENSIONS = """\
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""
CERTIFICATE_DAYS = "2"


def make_tls_files(directory: Path, name: str = "template suite test CA") -> TlsFiles:
    """A new CA named `name` and a server certificate it signed, in `directory` (made if
    missing), with OpenSSL from Debian's packages; EC P-256 keys, valid for two days."""
    openssl = require_program("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    (directory / "ca.cnf").write_text(CA_CONFIG.format(name=name))
    (directory / "server.ext").write_text(SERVER_EXTENSIONS)
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for command in (
        [
            *("req", "-x509", "-new", *new_key, "-keyout", "ca.key", "-out", files.ca.name),
            *("-days", CERTIFICATE_DAYS, "-config", "ca.cnf"),
        ],
        [
            *("req", "-new", *new_key, "-keyout", files.key.name, "-out", "server.csr"),
            *("-subj", "/CN=127.0.0.1"),
        ],
        [
            *("x509", "-req", "-in", "server.csr", "-CA", files.ca.name, "-CAkey", "ca.key"),
            *("-CAcreateserial", "-out", files.certificate.name, "-days", CERTIFICATE_DAYS),
            *("-extfile", "server.ext"),
        ],
    ):
        result = subprocess.run(
            [openssl, *command], cwd=directory, capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"openssl {' '.join(command)} failed:\n{(result.stdout + result.stderr)[-3000:]}"
            )
    return files


class AsUser(TypedDict, total=False):
    """subprocess's arguments that make the child switch to another user before it executes
    the program (empty: run as ourselves)."""

    user: int
    group: int
    extra_groups: list[int]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ThrowawayCluster:
    """initdb + pg_ctl in a temp dir, as the `postgres` user when running as root
    (PostgreSQL refuses to run as root). Loopback only.

    Trust auth unless `password` is given: then `postgres` has that password and every
    connection must present it (scram-sha-256). `fsync` is off by default, for speed; turn
    it on where what is tested is that committed data survives a crash. `replication`: the
    server also accepts streaming replication from loopback (wal_level=replica, WAL
    senders, a `replication` line in pg_hba.conf with the same authentication), so that a
    standby can be made from it (harness.replication). `tls`: the server also accepts TLS
    connections with that certificate (ssl=on); without it, ssl=off."""

    # Of the temporary directory's name: what kind of cluster it holds.
    kind = "throwaway"

    def __init__(
        self,
        bindir: Path,
        *,
        fsync: bool = False,
        password: str | None = None,
        replication: bool = False,
        tls: TlsFiles | None = None,
    ) -> None:
        self.bindir = bindir
        self.fsync = fsync
        self.password = password
        self.replication = replication
        self.tls = tls
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix=f"pg-{self.kind}-", dir="/tmp"))
        self.data = self.root / "data"
        # As root, commands run as `postgres` (set by the child before it executes them).
        self.as_user: AsUser = {}
        self.owner: tuple[int, int] | None = None
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise NoServerError(
                    "running as root and there is no 'postgres' user to run a throwaway "
                    "cluster as. " + HOW_TO_PROVIDE
                ) from None
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self.owner = (user.pw_uid, user.pw_gid)
            self.as_user = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    @property
    def url(self) -> str:
        user = "postgres" if self.password is None else f"postgres:{quote(self.password, safe='')}"
        return f"postgresql://{user}@127.0.0.1:{self.port}/postgres"

    def options(self) -> str:
        """The server's options (`pg_ctl -o`): `pg_ctl start` does not remember them."""
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=200"
        )
        if self.replication:
            options += f" -c wal_level=replica -c max_wal_senders={MAX_WAL_SENDERS}"
            options += f" -c max_replication_slots={MAX_WAL_SENDERS}"
        if self.tls is not None:
            options += f" -c ssl=on -c ssl_cert_file={self.root / 'server.crt'}"
            options += f" -c ssl_key_file={self.root / 'server.key'}"
        else:
            options += " -c ssl=off"
        return options

    @property
    def auth_method(self) -> str:
        return "trust" if self.password is None else "scram-sha-256"

    def _run(self, *args: str, timeout: float | None = None) -> None:
        subprocess.run(
            args,
            check=True,
            capture_output=True,
            text=True,
            cwd=self.root,
            timeout=timeout,
            **self.as_user,
        )

    def start(self) -> str:
        initdb = [str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-E", "UTF8"]
        initdb.append(f"--auth={self.auth_method}")
        if self.password is not None:
            pwfile = self.root / "pwfile"
            pwfile.write_text(self.password + "\n")
            pwfile.chmod(0o600)
            if self.owner is not None:
                os.chown(pwfile, *self.owner)
            initdb.append(f"--pwfile={pwfile}")
        if not self.fsync:
            initdb.append("--no-sync")
        try:
            self._run(*initdb)
        finally:
            (self.root / "pwfile").unlink(missing_ok=True)
        if self.tls is not None:
            # The server's own copies: it refuses a key that others may read.
            for source, name in (
                (self.tls.certificate, "server.crt"),
                (self.tls.key, "server.key"),
            ):
                copy = self.root / name
                shutil.copyfile(source, copy)
                copy.chmod(0o600)
                if self.owner is not None:
                    os.chown(copy, *self.owner)
        if self.replication:
            # initdb's own pg_hba.conf has such lines too; this one does not depend on it.
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write(f"host replication postgres 127.0.0.1/32 {self.auth_method}\n")
        self.pg_ctl_start(wait=True)
        return self.url

    def pg_ctl_start(self, *, wait: bool) -> None:
        """Start the server on the cluster's data directory; `wait`: until it accepts
        connections."""
        self._run(
            str(self.bindir / "pg_ctl"),
            *("-D", str(self.data), "-o", self.options()),
            *("-l", str(self.root / "server.log")),
            "-w" if wait else "-W",
            "start",
        )

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(
                    str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"
                )
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def provide() -> tuple[str, ThrowawayCluster | None]:
    """An admin URL for the tests, and the cluster to stop afterwards (if one was started)."""
    url = os.environ.get("TEST_DATABASE_URL", DEFAULT_URL)
    if answers(url):
        return url, None
    bindir = find_bindir()
    if bindir is None:
        raise NoServerError(f"nothing answers at TEST_DATABASE_URL={url!r}. " + HOW_TO_PROVIDE)
    cluster = ThrowawayCluster(bindir)
    try:
        return cluster.start(), cluster
    except Exception:
        cluster.stop()
        raise
