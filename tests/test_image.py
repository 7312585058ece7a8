"""The rendered service's container image, built and run with a real OCI engine (podman).

For each case the service is rendered, its Dockerfile built on the local stand-in for the
Python base image (harness.containers), the migrations run from the image, and the app run
from it against a fresh database on the test server (PostgreSQL, or PgBouncer in front of
it). Then a graceful shutdown under load, made deterministic with a table lock: requests
are held in the database when SIGTERM arrives and must all be answered before the
container exits with 0.

Marked slow; a missing engine that cannot be installed fails the tests, never skips them.
The figures (image size, build times, time to ready, shutdown) are printed and listed in
the terminal summary.
"""

from __future__ import annotations

import json
import re
import threading
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from harness import containers
from harness.containers import Container, ContainerError
from harness.pgbouncer import PgBouncer
from harness.pgserver import free_port
from harness.rendering import clean_env, render
from harness.services import run, scratch_database, with_database
from harness.system import MissingProgramError

pytestmark = pytest.mark.slow

APP_NAME = "my_service"  # the package name, which the engine sets as application_name
CASES: dict[str, dict[str, str]] = {
    "asyncpg": {"db_driver": "asyncpg"},
    "psycopg": {"db_driver": "psycopg"},
    "psycopg-pgbouncer": {"db_driver": "psycopg", "db_pooler": "pgbouncer"},
}
# Requests held in the database at SIGTERM: within the default pool (5 + 10 overflow), so
# each one holds a connection and waits on the lock.
CONCURRENT_REQUESTS = 12
# What `docker stop` and compose wait between SIGTERM and SIGKILL.
STOP_TIMEOUT = 10.0
READY_TIMEOUT = 60.0
REQUEST_TIMEOUT = 30.0
POLL = 0.05
# Console scripts of the dev tools that must not be in the final image.
DEV_PROGRAMS = ("pytest", "mypy", "ruff", "uv")


def name_of(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]


def until(condition: Any, timeout: float, what: str) -> float:
    """Poll `condition()` until it is true; return the seconds it took. Fails after
    `timeout` with `what`."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if condition():
            return time.monotonic() - started
        time.sleep(POLL)
    raise AssertionError(f"not within {timeout}s: {what}")


def report(request: pytest.FixtureRequest, label: str, figures: dict[str, str]) -> None:
    """Print the figures and keep them for the terminal summary (tests/conftest.py)."""
    line = f"{label}: " + ", ".join(f"{k} {v}" for k, v in figures.items())
    print("\n" + line)
    request.node.user_properties.append(("figures", line))


@pytest.fixture(scope="session")
def base_image() -> str:
    """The stand-in Python base image; fails (never skips) when podman is missing and
    cannot be installed, or the image cannot be built."""
    try:
        containers.require_podman()
        return containers.python_base_image()
    except (MissingProgramError, ContainerError) as exc:
        pytest.fail(f"no container engine for the image tests: {exc}", pytrace=False)


@pytest.fixture
def database(pg_admin_url: str) -> Iterator[str]:
    with scratch_database(pg_admin_url, "image") as name:
        yield name


@pytest.fixture
def image_tag() -> Iterator[str]:
    tag = f"localhost/template-suite-service:{uuid.uuid4().hex[:12]}"
    try:
        yield tag
    finally:
        containers.remove_image(tag)


def backends(admin_url: str, database: str, waiting: bool = False) -> list[int]:
    """Pids of the server processes with the service's application_name in `database`,
    only those waiting on a lock when `waiting`."""
    query = "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s"
    if waiting:
        query += " AND wait_event_type = 'Lock'"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        return [row[0] for row in conn.execute(query, (database, APP_NAME)).fetchall()]


def pgbouncer_show(bouncer: PgBouncer, what: str, database: str) -> list[dict[str, Any]]:
    """The rows of SHOW `what` (CLIENTS, SERVERS) on PgBouncer's admin console that belong
    to `database`. Without parameters psycopg uses the simple query protocol, which is all
    the console speaks."""
    with psycopg.connect(bouncer.url("pgbouncer"), autocommit=True, connect_timeout=5) as conn:
        cursor = conn.execute(f"SHOW {what}")
        columns = [c.name for c in cursor.description or []]
        rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    return [row for row in rows if row["database"] == database]


class HeldRequests:
    """`count` concurrent POST /items, each on its own HTTP connection, in threads."""

    def __init__(self, base_url: str, count: int) -> None:
        self.results: list[str | int | None] = [None] * count
        self.done_at = [0.0] * count
        self.threads = [
            threading.Thread(target=self._post, args=(base_url, i), daemon=True)
            for i in range(count)
        ]

    def _post(self, base_url: str, i: int) -> None:
        try:
            with httpx.Client(base_url=base_url, timeout=REQUEST_TIMEOUT) as client:
                body = {"name": f"held-{i}", "price_cents": i}
                self.results[i] = client.post("/items", json=body).status_code
        except httpx.HTTPError as exc:
            self.results[i] = repr(exc)
        self.done_at[i] = time.monotonic()

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def pending(self) -> int:
        return sum(thread.is_alive() for thread in self.threads)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert self.pending() == 0, f"{self.pending()} requests still open after {timeout}s"


def refused(base_url: str) -> bool:
    try:
        httpx.get(base_url + "/health", timeout=1)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False


def dev_tools_in(container: Container, root: Path) -> list[str]:
    """Dev-only distributions (the rendered dev group, less the runtime dependencies) and
    dev programs that the running image has."""
    project = tomllib.loads((root / "pyproject.toml").read_text())
    runtime = {name_of(r).lower() for r in project["project"]["dependencies"]}
    dev_only = sorted(
        {name_of(r) for r in project["dependency-groups"]["dev"]} - runtime | {"pip", "uv"}
    )
    script = (
        "import importlib.metadata as m, json, shutil, sys\n"
        "found = []\n"
        f"for name in {dev_only!r}:\n"
        "    try:\n"
        "        m.distribution(name)\n"
        "        found.append(name)\n"
        "    except m.PackageNotFoundError:\n"
        "        pass\n"
        f"found += [p for p in {list(DEV_PROGRAMS)!r} if shutil.which(p)]\n"
        "print(json.dumps(found))\n"
    )
    result = container.exec("python", "-c", script)
    assert result.returncode == 0, result.stdout + result.stderr
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("case", list(CASES))
def test_image_migrates_serves_and_stops_gracefully(
    case: str,
    base_image: str,
    image_tag: str,
    database: str,
    pg_admin_url: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    answers = CASES[case]
    root = render(tmp_path / "service", migrations="alembic", with_example=True, **answers)
    # Its own copy of the base, so that the first build runs every step (see private_base).
    build_args = {"PYTHON_IMAGE": containers.private_base(base_image, image_tag)}
    figures: dict[str, str] = {}

    # Cold: every step runs, on the base image that is there already.
    cold, _ = containers.build_image(root, image_tag, build_args)
    # Cached: the same context again; every step comes from the layer cache.
    cached, log = containers.build_image(root, image_tag, build_args)
    assert "Using cache" in log, log[-3000:]
    assert "Resolved" not in log, log[-3000:]  # uv did not run again
    size = containers.image_size(image_tag)
    figures |= {
        "image": f"{size / 1e6:.0f} MB",
        "build cold": f"{cold:.1f} s",
        "cached": f"{cached:.1f} s",
    }

    config = containers.image_inspect(image_tag)
    user = config["Config"].get("User", "")
    assert user.split(":")[0] not in {"", "0", "root"}, f"image runs as {user!r}"
    env = dict(item.split("=", 1) for item in config["Config"].get("Env", []))
    grace = float(env["UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN"])
    assert 0 < grace < STOP_TIMEOUT - 1
    assert config["Config"]["Cmd"][0] == "uvicorn"
    assert "--port" not in config["Config"]["Cmd"]

    direct_url = with_database(pg_admin_url, database)
    server = urlsplit(pg_admin_url)
    bouncer: PgBouncer | None = None
    if answers.get("db_pooler") == "pgbouncer":
        bouncer = PgBouncer(
            server_port=server.port or 5432,
            server_host=server.hostname or "127.0.0.1",
            pool_size=CONCURRENT_REQUESTS + 4,
        ).start()
    try:
        app_url = bouncer.url(database) if bouncer else direct_url
        migrate_env = {"DATABASE_URL": app_url}
        if bouncer:
            migrate_env["DATABASE_MIGRATION_URL"] = direct_url

        # The image runs the migrations; with PgBouncer, past it on the direct URL.
        migrated = containers.run_once(image_tag, "alembic", "upgrade", "head", env=migrate_env)
        assert migrated.returncode == 0, migrated.stdout + migrated.stderr
        with psycopg.connect(direct_url, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT to_regclass('items') IS NOT NULL, (SELECT version_num FROM alembic_version)"
            ).fetchone()
        assert row is not None
        assert row[0], "no items table"
        assert row[1], "no revision in alembic_version"
        if bouncer:
            assert pgbouncer_show(bouncer, "SERVERS", database) == []

        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        app_env = {"DATABASE_URL": app_url, "UVICORN_PORT": str(port)}
        with Container(image_tag, env=app_env) as app:
            started = time.monotonic()

            def ready() -> bool:
                if not app.running():
                    raise AssertionError(f"the app container exited:\n{app.logs()[-4000:]}")
                try:
                    return httpx.get(base_url + "/health/db", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            until(ready, READY_TIMEOUT, "/health/db answers 200")
            figures["run to /health/db 200"] = f"{time.monotonic() - started:.2f} s"

            # The image's HEALTHCHECK, run on demand: it must find the app on UVICORN_PORT.
            health = containers.podman("healthcheck", "run", app.name, check=False)
            assert health.returncode == 0, health.stdout + health.stderr + app.logs()[-2000:]

            created = httpx.post(
                base_url + "/items", json={"name": "from the image", "price_cents": 42}, timeout=10
            )
            assert created.status_code == 201, created.text
            item_id = created.json()["id"]
            read = httpx.get(f"{base_url}/items/{item_id}", timeout=10)
            assert read.status_code == 200, read.text
            assert read.json()["name"] == "from the image"

            uid = app.exec("id", "-u")
            assert uid.returncode == 0, uid
            assert uid.stdout.strip() not in {"", "0"}, uid
            assert dev_tools_in(app, root) == []

            # Graceful shutdown: hold every request in the database, then SIGTERM.
            with psycopg.connect(direct_url, connect_timeout=5) as locker:
                locker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
                held = HeldRequests(base_url, CONCURRENT_REQUESTS)
                held.start()
                until(
                    lambda: (
                        len(backends(pg_admin_url, database, waiting=True)) == CONCURRENT_REQUESTS
                    ),
                    10,
                    f"{CONCURRENT_REQUESTS} of the service's backends wait on the lock",
                )
                app.kill("TERM")
                signalled = time.monotonic()
                # Uvicorn stops listening at once, and keeps the held requests.
                until(lambda: refused(base_url), 5, "new connections are refused after SIGTERM")
                assert app.running()
                assert held.pending() == CONCURRENT_REQUESTS, held.results
                held_for = time.monotonic() - signalled
                locker.rollback()  # releases the lock
                released = time.monotonic()
            exit_code = app.wait(timeout=STOP_TIMEOUT + 5)
            exited = time.monotonic()
            stopped = exited - signalled
            logs = app.logs()
            held.join(REQUEST_TIMEOUT)
        answered = sum(result == 201 for result in held.results)
        figures |= {
            "SIGTERM to exit": f"{stopped:.2f} s (requests held {held_for:.2f} s of it, "
            f"last answer {max(held.done_at) - released:.2f} s after the release, "
            f"exit {exited - max(held.done_at):.2f} s after it)",
            "requests answered": f"{answered}/{CONCURRENT_REQUESTS}",
        }
        report(request, f"image {case}", figures)
        assert held.results == [201] * CONCURRENT_REQUESTS, held.results
        assert exit_code == 0, logs[-4000:]
        assert stopped < STOP_TIMEOUT, f"exit took {stopped:.1f}s after SIGTERM"
        assert "Application shutdown complete" in logs, logs[-4000:]

        # No connection of the service is left: the lifespan closed the pool.
        if bouncer is None:
            until(
                lambda: backends(pg_admin_url, database) == [],
                5,
                f"no connection with application_name {APP_NAME} in pg_stat_activity",
            )
        else:
            # Behind PgBouncer the service's connections end at PgBouncer: none may be left
            # there, and every server connection with the service's name is PgBouncer's
            # own pooled one (transaction pooling keeps them for the next client).
            until(
                lambda: pgbouncer_show(bouncer, "CLIENTS", database) == [],
                5,
                "no client connection of the service left at PgBouncer",
            )
            pooled = {s["remote_pid"] for s in pgbouncer_show(bouncer, "SERVERS", database)}
            assert set(backends(pg_admin_url, database)) <= pooled
    finally:
        if bouncer is not None:
            bouncer.stop()


def test_image_builds_from_a_committed_lock_and_refuses_a_stale_one(
    base_image: str, image_tag: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    root = render(tmp_path / "service")
    run(["uv", "lock", "--quiet"], cwd=root, env=clean_env(), timeout=300)
    lock = tomllib.loads((root / "uv.lock").read_text())
    locked = {p["name"]: p["version"] for p in lock["package"] if "version" in p}

    build_args = {"PYTHON_IMAGE": containers.private_base(base_image, image_tag)}
    elapsed, _ = containers.build_image(root, image_tag, build_args)
    report(request, "image asyncpg with uv.lock", {"build": f"{elapsed:.1f} s"})
    names = ["fastapi", "sqlalchemy", "asyncpg", "uvicorn"]
    shown = containers.run_once(
        image_tag,
        "python",
        "-c",
        f"import importlib.metadata as m; print(*[m.version(n) for n in {names!r}])",
    )
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert shown.stdout.split() == [locked[n] for n in names]

    # A dependency added without `uv lock`: --locked refuses to build.
    pyproject = root / "pyproject.toml"
    added = '"httpx>=0.28",\n    "uvicorn[standard]'
    pyproject.write_text(pyproject.read_text().replace('"uvicorn[standard]', added))
    with pytest.raises(ContainerError, match=r"(?i)lockfile .*needs to be updated"):
        containers.build_image(root, image_tag, build_args)
