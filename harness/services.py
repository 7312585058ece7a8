"""Running a rendered service for real: a PostgreSQL cluster that can be stopped and
started again, databases on a server, and the service under uvicorn as a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
from psycopg import sql

from .pgserver import HOW_TO_PROVIDE, NoServerError, ThrowawayCluster, find_bindir, free_port
from .rendering import REPO_ROOT, clean_env, render

# Every wait below is bounded by one of these.
SERVICE_START_TIMEOUT = 30.0
SERVICE_STOP_TIMEOUT = 10.0
DATABASE_START_TIMEOUT = 30.0
POLL_INTERVAL = 0.05

UV_RUN = ["uv", "run", "--no-sync"]

# What Service runs by default: the rendered package's application factory (`create_app()`,
# which needs no arguments), under `uvicorn --factory`.
DEFAULT_APP = "my_service.main:create_app"


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(cmd)} failed in {cwd}:\n{output[-6000:]}"
    return output


class RestartableCluster(ThrowawayCluster):
    """A ThrowawayCluster whose server can be stopped and started again on the same port
    and data directory, as an operator restarting the database would, or crash."""

    def stop_server(self) -> None:
        """Fast shutdown: open sessions are ended; returns once the server is gone."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def crash_server(self) -> None:
        """Immediate shutdown, as in a crash: every server process quits at once, without a
        checkpoint, and the next start recovers from the write-ahead log. Returns once the
        server is gone."""
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
        )

    def start_server(self, *, wait: bool = False) -> None:
        """Start the stopped server. Without `wait` it returns at once and the caller times
        its readiness; with `wait`, once the server accepts connections."""
        self.pg_ctl_start(wait=wait)


def report(record_property: Callable[[str, Any], None], label: str, figures: str) -> None:
    """Print a test's figures and keep them (pytest's `record_property`) for the list at the
    end of the run (tests/conftest.py), also from pytest-xdist workers."""
    print(f"\n[{label}] {figures}")
    record_property("figures", f"{label}: {figures}")


def render_synced(dst: Path, **data: Any) -> Path:
    """Render the template into `dst` with `data` and install the project's environment
    (`uv sync`); return the project's root."""
    root = render(dst, **data)
    run(["uv", "sync", "--quiet"], root, clean_env())
    return root


# Programs the tests copy into a rendered project and run there (ruff and mypy check them).
TEST_PROGRAMS = REPO_ROOT / "tests" / "programs"


def copy_program(name: str, destination: Path) -> Path:
    """Copy tests/programs/`name` to `destination` (a file in a rendered project); return
    `destination`."""
    destination.write_text((TEST_PROGRAMS / name).read_text())
    return destination


@contextlib.contextmanager
def throwaway_cluster(**options: Any) -> Iterator[RestartableCluster]:
    """A started RestartableCluster of its own (`options`: fsync, password, replication),
    removed afterwards: for tests that stop or crash the server, never the shared one."""
    bindir = find_bindir()
    if bindir is None:
        raise NoServerError(
            "no PostgreSQL server binaries for a throwaway cluster. " + HOW_TO_PROVIDE
        )
    cluster = RestartableCluster(bindir, **options)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def migrate(root: Path, database_url: str, **env: str) -> str:
    """`alembic upgrade head` in a rendered project (`env`: more settings); its output."""
    env = {"DATABASE_URL": database_url, **env}
    return run([*UV_RUN, "alembic", "upgrade", "head"], root, clean_env(**env))


def wait_until(
    condition: Callable[[], object], timeout: float, what: str, interval: float = POLL_INTERVAL
) -> float:
    """Poll `condition()` until it is true; return the seconds it took. Fails after
    `timeout` with `what`."""
    started = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(interval)


async def wait_until_async(
    condition: Callable[[], object], timeout: float, what: str, interval: float = POLL_INTERVAL
) -> float:
    """wait_until() for a coroutine: polls without blocking the event loop's other tasks."""
    started = time.monotonic()
    while True:
        if condition():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(interval)


def wait_accepting(url: str, timeout: float = DATABASE_START_TIMEOUT) -> float:
    """Wait until the server at `url` accepts logins and queries; the seconds it took."""
    return wait_until(
        lambda: accepts_connections(url), timeout, "the server accepts connections", 0.01
    )


def accepts_connections(url: str) -> bool:
    """A client can log in and run a query (not merely open a TCP connection)."""
    try:
        with psycopg.connect(url, connect_timeout=1, autocommit=True) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def with_database(url: str, name: str) -> str:
    """`url` with its database replaced by `name` (query parameters kept)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


def create_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        query = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        conn.execute(query)


@contextlib.contextmanager
def scratch_database(admin_url: str, prefix: str) -> Iterator[str]:
    """A new database on the server of `admin_url`, named `prefix` and a random suffix, and
    dropped afterwards with whatever is still connected to it: yields its name."""
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    create_database(admin_url, name)
    try:
        yield name
    finally:
        drop_database(admin_url, name)


class Service:
    """`uv run --no-sync uvicorn <app>` in a rendered project, on a free loopback port, with
    its output in a log file (stdout and stderr together, unless `stderr_path` is given:
    then stdout goes to `log_path` and stderr to `stderr_path`). Ready once every worker
    has started and /health answers.

    `app` is what uvicorn loads. By default the rendered package's factory,
    `--factory my_service.main:create_app`; any other string is passed as it is, as an
    application (add "--factory" to `uvicorn_args` if it names a factory instead). The
    other keywords are the service's environment variables."""

    def __init__(
        self,
        root: Path,
        log_path: Path,
        *,
        app: str = DEFAULT_APP,
        workers: int = 1,
        uvicorn_args: tuple[str, ...] = (),
        stderr_path: Path | None = None,
        **env: str,
    ) -> None:
        self.root = root
        self.log_path = log_path
        self.stderr_path = stderr_path
        self.app = app
        self.workers = workers
        self.uvicorn_args = uvicorn_args
        self.env = clean_env(**env)
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stderr(self) -> str:
        """What the service wrote to stderr, when it has a file of its own."""
        path = self.stderr_path
        return path.read_text(errors="replace") if path is not None and path.exists() else ""

    def start(self) -> None:
        factory = ("--factory",) if self.app == DEFAULT_APP else ()
        cmd = [
            *("uv", "run", "--no-sync", "uvicorn", *factory, self.app),
            *("--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)),
            *("--timeout-graceful-shutdown", "3", *self.uvicorn_args),
        ]
        with contextlib.ExitStack() as files:
            log = files.enter_context(self.log_path.open("wb"))
            errors: IO[bytes] | int = subprocess.STDOUT
            if self.stderr_path is not None:
                errors = files.enter_context(self.stderr_path.open("wb"))
            # Own process group: stopping it reaches uvicorn under `uv run` too.
            self.proc = subprocess.Popen(
                cmd,
                cwd=self.root,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=errors,
                start_new_session=True,
            )
        deadline = time.monotonic() + SERVICE_START_TIMEOUT
        with httpx.Client(base_url=self.base_url, timeout=2) as client:
            for _ in range(int(SERVICE_START_TIMEOUT / POLL_INTERVAL)):
                if time.monotonic() > deadline:
                    break
                if self.proc.poll() is not None:
                    raise AssertionError(
                        f"uvicorn exited with {self.proc.returncode}:\n{self.log()[-4000:]}"
                    )
                if self.log().count("Application startup complete") >= self.workers:
                    with contextlib.suppress(httpx.TransportError):
                        if client.get("/health").status_code == 200:
                            return
                time.sleep(POLL_INTERVAL)
        raise AssertionError(
            f"uvicorn --workers {self.workers} was not ready within {SERVICE_START_TIMEOUT}s:\n"
            f"{self.log()[-4000:]}"
        )

    def kill(self) -> None:
        """SIGKILL to every process of the service (uv and uvicorn): no shutdown of any
        kind runs. Returns once `uv` has exited."""
        proc = self.proc
        assert proc is not None, "the service was never started"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=SERVICE_STOP_TIMEOUT)

    def stop(self) -> None:
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=SERVICE_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=SERVICE_STOP_TIMEOUT)
        # Stopping the supervisor stops its workers; make sure none outlived it.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


@contextlib.contextmanager
def running_service(
    root: Path, log_path: Path, *, workers: int = 1, **env: str
) -> Iterator[Service]:
    # Every keyword of Service that is not a string is given, so that `env` fills only
    # environment variables (and mypy can tell).
    service = Service(root, log_path, workers=workers, uvicorn_args=(), stderr_path=None, **env)
    try:
        service.start()
        yield service
    finally:
        service.stop()


async def drive_load(
    base_url: str,
    requests: int,
    concurrency: int,
    send: Callable[[httpx.AsyncClient, int], Awaitable[None]],
    *,
    request_timeout: float,
    timeout: float,
) -> float:
    """Await `send(client, n)` once for each n in range(requests), `concurrency` at a time;
    `send` records what it needs. Returns the seconds it took; fails after `timeout`.

    Each of the `concurrency` workers has its own single-connection client: one AsyncClient
    with 100 connections spends about 8 ms of CPU per request in its connection pool on these
    machines (about 1 ms with one connection each), so the client, not the service, would set
    the pace.
    """
    numbers = itertools.count()  # shared: each request number is taken once
    one_connection = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    # Plain HTTP, but each client would still load the CA bundle (tens of ms) for its own
    # TLS context: build one, before the clock starts.
    tls = ssl.create_default_context()

    async def worker(client: httpx.AsyncClient) -> None:
        for n in numbers:
            if n >= requests:
                return
            await send(client, n)

    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=base_url, limits=one_connection, timeout=request_timeout, verify=tls
                )
            )
            for _ in range(concurrency)
        ]
        started = time.perf_counter()
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(worker(client) for client in clients))
        return time.perf_counter() - started


class ConnectionSampler(threading.Thread):
    """Counts the client connections to one database every `interval` seconds, on its own
    connection to `admin_url` (another database, so it does not count itself). Autovacuum
    workers, which also show under the database's name, are left out."""

    def __init__(
        self, admin_url: str, datname: str, interval: float = 0.02, max_samples: int = 10_000
    ) -> None:
        super().__init__(daemon=True)
        self.admin_url = admin_url
        self.datname = datname
        self.interval = interval
        self.max_samples = max_samples
        self.samples: list[int] = []
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    def run(self) -> None:
        try:
            with psycopg.connect(self.admin_url, autocommit=True, connect_timeout=5) as conn:
                while not self._stop_event.is_set() and len(self.samples) < self.max_samples:
                    # A new snapshot each time: pg_stat_activity is cached per transaction,
                    # and in autocommit every statement is its own.
                    row = conn.execute(
                        "SELECT count(*) FROM pg_stat_activity "
                        "WHERE datname = %s AND backend_type = 'client backend'",
                        (self.datname,),
                    ).fetchone()
                    assert row is not None
                    self.samples.append(int(row[0]))
                    self._stop_event.wait(self.interval)
        except BaseException as exc:
            self.error = exc

    def finish(self, timeout: float = 10) -> list[int]:
        self._stop_event.set()
        self.join(timeout)
        assert not self.is_alive(), "the connection sampler did not stop"
        if self.error is not None:
            raise AssertionError(f"the connection sampler failed: {self.error!r}")
        return self.samples
