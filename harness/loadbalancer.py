"""A real HAProxy in front of instances of a rendered service, as a rolling deploy uses one:
round robin, a health check on the readiness endpoint, retries on another instance when a
connection fails, and the runtime API (a stats socket) to drain an instance, point its slot at
a new process and put it back.

HAProxy runs in the foreground (`-db`) as our child, with its configuration, socket and log in
a temporary directory. Every wait is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

from .pgserver import free_port
from .system import require_program

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
STATE_TIMEOUT = 15.0
POLL_INTERVAL = 0.02
# Tries with a new port when the chosen one was taken before HAProxy could bind it.
START_ATTEMPTS = 3
BACKEND = "app"
# The response header that names the server slot which answered.
SERVED_BY = "X-Served-By"


class HAProxyError(RuntimeError):
    pass


def require_haproxy() -> str:
    """The haproxy program: installed from Debian's package when missing and run as root,
    otherwise a MissingProgramError that says how to install it."""
    return require_program("haproxy")


class HAProxy:
    """HAProxy on 127.0.0.1 balancing HTTP over `servers` (slot name: port on 127.0.0.1),
    each checked with GET `check_path` every `check_interval` seconds (up after `rise`
    answers of 200 in a row, down after `fall` failures). A request whose connection to an
    instance fails is sent again, to another instance (`retries`, `option redispatch`).
    Answers carry the slot that served them in the X-Served-By header.

    Use as a context manager, or call start() and stop()."""

    def __init__(
        self,
        servers: Mapping[str, int],
        *,
        check_path: str = "/health",
        check_interval: float = 0.2,
        rise: int = 2,
        fall: int = 2,
        executable: str | None = None,
    ) -> None:
        self.servers = dict(servers)
        self.check_path = check_path
        self.check_interval_ms = max(1, round(check_interval * 1000))
        self.rise = rise
        self.fall = fall
        self.executable = executable or require_haproxy()
        self.port = 0
        self.root: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        assert self.port, "HAProxy has not been started"
        return f"http://127.0.0.1:{self.port}"

    def _path(self, name: str) -> Path:
        assert self.root is not None, "HAProxy has not been started"
        return self.root / name

    def log(self) -> str:
        """HAProxy's output: its messages and one line per request (httplog)."""
        if self.root is None or not self._path("haproxy.log").exists():
            return ""
        return self._path("haproxy.log").read_text(errors="replace")

    def _config(self) -> str:
        servers = [
            f"    server {name} 127.0.0.1:{port} check" for name, port in self.servers.items()
        ]
        return "\n".join(
            [
                "global",
                f"    stats socket {self._path('admin.sock')} mode 600 level admin",
                "    log stdout format raw local0",
                "",
                "defaults",
                "    mode http",
                "    log global",
                "    option httplog",
                "    timeout connect 2s",
                "    timeout client 60s",
                "    timeout server 60s",
                "    timeout queue 30s",
                # A connection an instance refuses or resets before answering is tried
                # again, the last time on another instance.
                "    retries 3",
                "    option redispatch 1",
                "",
                "frontend web",
                f"    bind 127.0.0.1:{self.port}",
                f"    default_backend {BACKEND}",
                "",
                f"backend {BACKEND}",
                "    balance roundrobin",
                f"    option httpchk GET {self.check_path}",
                "    http-check expect status 200",
                f"    http-response set-header {SERVED_BY} %s",
                f"    default-server inter {self.check_interval_ms}ms"
                f" rise {self.rise} fall {self.fall}",
                *servers,
                "",
            ]
        )

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> HAProxy:
        self.root = Path(tempfile.mkdtemp(prefix="haproxy-", dir="/tmp"))
        failures: list[str] = []
        try:
            for _ in range(START_ATTEMPTS):
                self.port = free_port()
                self._path("haproxy.cfg").write_text(self._config())
                if self._launch():
                    return self
                failures.append(f"port {self.port}:\n{self.log()[-2000:]}")
                self._terminate()
        except BaseException:
            self.stop()
            raise
        self.stop()
        raise HAProxyError(
            f"HAProxy did not start ({START_ATTEMPTS} tries):\n" + "\n".join(failures)
        )

    def _launch(self) -> bool:
        """Start the process; True once its frontend accepts connections and its runtime API
        answers, False if it exited or timed out."""
        with self._path("haproxy.log").open("wb") as log:
            self.proc = subprocess.Popen(
                [self.executable, "-db", "-f", str(self._path("haproxy.cfg"))],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            # The socket's answer proves that this HAProxy, not another process, is up; it
            # binds its frontend before it opens the socket.
            with contextlib.suppress(OSError):
                if "pxname" in self.command("show stat"):
                    return True
            time.sleep(POLL_INTERVAL)
        return False

    def _terminate(self) -> None:
        """SIGTERM (HAProxy's immediate stop), then SIGKILL; bounded."""
        proc = self.proc
        if proc is None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=STOP_TIMEOUT)
        self.proc = None

    def stop(self) -> None:
        try:
            self._terminate()
        finally:
            if self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)
                self.root = None

    def __enter__(self) -> HAProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- runtime API ---------------------------------------------------------------------

    def command(self, line: str) -> str:
        """One command on the runtime API (the stats socket); its answer."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(self._path("admin.sock")))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def _change(self, line: str, answer: str = "") -> None:
        """A command whose answer is empty, or contains `answer`, when it worked."""
        said = self.command(line).strip()
        if said and not (answer and answer in said):
            raise HAProxyError(f"{line!r}: {said}")

    def stats(self, name: str) -> dict[str, str]:
        """The `show stat` row of the server slot `name`: status (UP, DOWN, DRAIN, MAINT),
        scur (requests in progress), qcur (queued), stot (served) and the rest."""
        text = self.command("show stat").lstrip("# ")
        for row in csv.DictReader(io.StringIO(text)):
            if row["pxname"] == BACKEND and row["svname"] == name:
                return row
        raise HAProxyError(f"no server {name!r} in `show stat`:\n{text}")

    def wait_for(self, name: str, what: str, condition: Callable[[dict[str, str]], bool]) -> float:
        """Poll the slot's stats until `condition(row)` holds; the seconds it took."""
        started = time.monotonic()
        while True:
            row = self.stats(name)
            if condition(row):
                return time.monotonic() - started
            if time.monotonic() - started > STATE_TIMEOUT:
                raise AssertionError(
                    f"not within {STATE_TIMEOUT}s: {name} {what}; status {row['status']}, "
                    f"{row['scur']} in progress, {row['qcur']} queued"
                )
            time.sleep(POLL_INTERVAL)

    def wait_up(self, name: str) -> float:
        """Until HAProxy's checks see the slot's instance ready; the seconds it took."""
        return self.wait_for(name, "is up", lambda row: row["status"] == "UP")

    def drain(self, name: str) -> float:
        """Take the slot out of the balancing (no new request goes to it; its checks go on)
        and wait until its requests in progress have been answered: then its instance may
        stop. Returns the seconds that took."""
        self._change(f"set server {BACKEND}/{name} state drain")
        return self.wait_for(
            name, "has no request in progress", lambda row: row["scur"] == row["qcur"] == "0"
        )

    def replace(self, name: str, port: int) -> float:
        """Point the drained slot at 127.0.0.1:`port` and put it back in the balancing once
        HAProxy's own checks found the instance there ready (`rise` answers of 200 in a row).
        Returns the seconds until it takes requests again."""
        started = time.monotonic()
        self._change(f"set server {BACKEND}/{name} addr 127.0.0.1 port {port}", "change")
        self.servers[name] = port
        # Down until checked again: what the checks saw at the old address does not count.
        self._change(f"set server {BACKEND}/{name} health down")
        # DRAIN: up by its checks, still out of the balancing.
        self.wait_for(name, "passes its checks", lambda row: row["status"] == "DRAIN")
        self._change(f"set server {BACKEND}/{name} state ready")
        self.wait_up(name)
        return time.monotonic() - started
