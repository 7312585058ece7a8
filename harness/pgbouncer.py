"""A real PgBouncer in transaction mode in front of a PostgreSQL server, and a rendered
service under uvicorn with several worker processes.

PgBouncer refuses to run as root: as root it runs as the `postgres` user, with its
configuration, log and pid files in a temporary directory that user owns. Every wait is
bounded in count and time.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from .pgserver import AsUser, free_port
from .system import require_program

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0
# Tries with a new port when the chosen one was taken before PgBouncer could bind it.
START_ATTEMPTS = 3


class PgBouncerError(RuntimeError):
    pass


def require_pgbouncer() -> str:
    """The pgbouncer program: installed from Debian's package when missing and run as root,
    otherwise a MissingProgramError that says how to install it."""
    return require_program("pgbouncer")


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class PgBouncer:
    """PgBouncer on 127.0.0.1 in transaction mode, forwarding every database name to the
    server at `server_host:server_port`, with trust authentication for `postgres`.

    Use as a context manager, or call start() and stop(). No startup parameter other than
    the ones PgBouncer tracks itself is accepted (only extra_float_digits is ignored): a
    client that sends statement_timeout or options is refused, as by a managed pooler.
    """

    def __init__(
        self,
        server_port: int,
        server_host: str = "127.0.0.1",
        pool_size: int = 10,
        max_client_conn: int = 1000,
        executable: str | None = None,
    ) -> None:
        self.server_host = server_host
        self.server_port = server_port
        self.pool_size = pool_size
        self.max_client_conn = max_client_conn
        self.executable = executable or require_pgbouncer()
        self.port = 0
        self.root: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._owner: tuple[int, int] | None = None

    # -- files ---------------------------------------------------------------------------

    @property
    def ini_path(self) -> Path:
        assert self.root is not None, "PgBouncer has not been started"
        return self.root / "pgbouncer.ini"

    @property
    def log_path(self) -> Path:
        assert self.root is not None, "PgBouncer has not been started"
        return self.root / "pgbouncer.log"

    @property
    def pid_path(self) -> Path:
        assert self.root is not None, "PgBouncer has not been started"
        return self.root / "pgbouncer.pid"

    def log(self) -> str:
        if self.root is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def url(self, database: str) -> str:
        assert self.port, "PgBouncer has not been started"
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _config(self) -> str:
        assert self.root is not None
        return "\n".join(
            [
                "[databases]",
                f"* = host={self.server_host} port={self.server_port}",
                "",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {self.port}",
                "unix_socket_dir =",
                "auth_type = trust",
                f"auth_file = {self.root / 'userlist.txt'}",
                # Roles that are not in auth_file (a service's own runtime role, created by
                # its tests) are looked up in the server's pg_shadow as postgres.
                "auth_user = postgres",
                "admin_users = postgres",
                "pool_mode = transaction",
                f"default_pool_size = {self.pool_size}",
                "min_pool_size = 0",
                "reserve_pool_size = 0",
                f"max_client_conn = {self.max_client_conn}",
                # Deliberately not statement_timeout or options: a service behind a
                # transaction pooler must not send them at connect.
                "ignore_startup_parameters = extra_float_digits",
                f"logfile = {self.log_path}",
                f"pidfile = {self.pid_path}",
                "",
            ]
        )

    def _write(self, path: Path, text: str) -> None:
        path.write_text(text)
        if self._owner is not None:
            os.chown(path, *self._owner)

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> PgBouncer:
        self.root = Path(tempfile.mkdtemp(prefix="pgbouncer-", dir="/tmp"))
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                self._remove_dir()
                raise PgBouncerError(
                    "running as root and there is no 'postgres' user to run PgBouncer as"
                ) from None
            self._owner = (user.pw_uid, user.pw_gid)
            os.chown(self.root, *self._owner)
        self._write(self.root / "userlist.txt", '"postgres" ""\n')
        failures: list[str] = []
        try:
            for _ in range(START_ATTEMPTS):
                self.port = free_port()
                self._write(self.ini_path, self._config())
                with contextlib.suppress(FileNotFoundError):
                    self.log_path.unlink()
                if self._launch():
                    return self
                failures.append(f"port {self.port}:\n{self.log()[-2000:]}")
                self._terminate()
        except BaseException:
            self.stop()
            raise
        self.stop()
        raise PgBouncerError(
            f"PgBouncer did not start ({START_ATTEMPTS} tries):\n" + "\n".join(failures)
        )

    def _launch(self) -> bool:
        """Start the process; True once it listens, False if it exited or timed out."""
        # As root, the child switches to postgres before it executes pgbouncer: what `runuser
        # -u postgres --` does, without runuser's process in between (on SIGTERM it waits
        # 2 s before it passes SIGKILL on, which made every stop take 2 s).
        as_user: AsUser = (
            {"user": self._owner[0], "group": self._owner[1], "extra_groups": []}
            if self._owner is not None
            else {}
        )
        self.proc = subprocess.Popen(
            [self.executable, str(self.ini_path)],
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            **as_user,
        )
        deadline = time.monotonic() + START_TIMEOUT
        for _ in range(int(START_TIMEOUT / 0.02) + 1):
            if self.proc.poll() is not None:
                return False
            # The log line proves that this PgBouncer, not some other process, holds the port.
            if "process up" in self.log() and _port_open(self.port):
                return True
            if time.monotonic() > deadline:
                break
            time.sleep(0.02)
        return False

    def _terminate(self) -> None:
        """SIGTERM (PgBouncer's immediate shutdown), then SIGKILL; bounded. PgBouncer runs
        in the foreground as our child, so the process we started is PgBouncer itself."""
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

    def _remove_dir(self) -> None:
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def stop(self) -> None:
        try:
            self._terminate()
        finally:
            self._remove_dir()

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
