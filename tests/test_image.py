"""The rendered service's container image, built and run with a real OCI engine (podman).

The cases come from copier.yml: one per db_driver answer, and one per pooler answer other
than the default, on a PostgreSQL driver. For each, the service is rendered and its
Dockerfile built on the local stand-in for the Python base image (harness.containers), once
(module-scoped fixtures, one pytest-xdist worker per case); each test checks one thing of
that image: a second build comes from the layer cache; the image's user and command; the
migrations run from the image, against a fresh database on the test server (PostgreSQL,
PgBouncer in front of it, or the SQLite file on a named volume); the app run from it answers
its health check and serves items, as a non-root user without the dev tools. PostgreSQL:
a graceful shutdown under load, made deterministic with a table lock (requests held in the
database when SIGTERM arrives must all be answered before the container exits with 0).
SQLite: the data on the volume survives the container (stopped with SIGTERM, exit 0) and is
read by a new one.

Marked slow; a missing engine that cannot be installed fails the tests, never skips them.
The figures (image size, build times, time to ready, shutdown) are printed and listed in
the terminal summary.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from extensions.context import DRIVERS
from harness import containers
from harness.containers import Container, ContainerError
from harness.pgbouncer import PgBouncer
from harness.pgserver import free_port
from harness.rendering import answer_values, clean_env, postgres_drivers, questions, render
from harness.services import report, run, scratch_database, wait_until, with_database
from harness.system import MissingProgramError

# Every test of the module on one pytest-xdist worker: podman's image store is not safe for a
# build beside another build's removal (a build checking its layer cache failed with "getting
# top layer info: layer not known" while another case's images were being removed).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("image")]

APP_NAME = "my_service"  # the package name, which the engine sets as application_name
# Requests held in the database at SIGTERM: within the default pool (5 + 10 overflow), so
# each one holds a connection and waits on the lock.
CONCURRENT_REQUESTS = 12
# What `docker stop` and compose wait between SIGTERM and SIGKILL.
STOP_TIMEOUT = 10.0
READY_TIMEOUT = 60.0
REQUEST_TIMEOUT = 30.0
# Console scripts of the dev tools that must not be in the final image.
DEV_PROGRAMS = ("pytest", "mypy", "ruff", "uv")
# Where the SQLite image keeps its database file (its VOLUME).
SQLITE_DATA = "/app/data"


NO_POOLER = questions()["db_pooler"]["default"]


def image_cases() -> dict[str, dict[str, str]]:
    """Case name -> answers: each db_driver answer, and each pooler answer other than the
    default on the last PostgreSQL driver."""
    cases = {driver: {"db_driver": driver} for driver in answer_values("db_driver")}
    driver = postgres_drivers()[-1]
    for pooler in answer_values("db_pooler"):
        if pooler != NO_POOLER:
            cases[f"{driver}-{pooler}"] = {"db_driver": driver, "db_pooler": pooler}
    return cases


CASES = image_cases()


def is_postgres(case: str) -> bool:
    return bool(DRIVERS[CASES[case]["db_driver"]]["is_postgres"])


def cases_where(keep: Callable[[str], bool]) -> list[Any]:
    """The cases for `built` (indirect)."""
    return [pytest.param(case, id=case) for case in CASES if keep(case)]


EVERY_CASE = cases_where(lambda case: True)
POSTGRES_CASES = cases_where(is_postgres)
SQLITE_CASES = cases_where(lambda case: not is_postgres(case))


def name_of(requirement: str) -> str:
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0]


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
def image_tag() -> Iterator[str]:
    tag = f"localhost/template-suite-service:{uuid.uuid4().hex[:12]}"
    try:
        yield tag
    finally:
        containers.remove_image(tag)


@dataclass
class Built:
    """A case's rendered service and its image, built once (cold: every step ran)."""

    case: str
    answers: dict[str, str]
    root: Path
    tag: str
    build_args: dict[str, str]
    cold_seconds: float


@pytest.fixture(scope="module")
def built(
    request: pytest.FixtureRequest, base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Built]:
    case: str = request.param
    answers = CASES[case]
    root = render(
        tmp_path_factory.mktemp(f"image-{case}") / "service",
        migrations="alembic",
        with_example=True,
        **answers,
    )
    tag = f"localhost/template-suite-service:{uuid.uuid4().hex[:12]}"
    try:
        # Its own copy of the base, so that the first build runs every step (see private_base).
        build_args = {"PYTHON_IMAGE": containers.private_base(base_image, tag)}
        cold, _ = containers.build_image(root, tag, build_args)
        yield Built(case, answers, root, tag, build_args, cold)
    finally:
        containers.remove_image(tag)


@dataclass
class Deployment:
    """Where a case's image keeps its data, migrated by the image: a fresh database on the
    test server (through PgBouncer with the pooler), or a named volume (SQLite)."""

    env: dict[str, str]  # the app's settings
    volumes: dict[str, str] = field(default_factory=dict)
    database: str = ""  # PostgreSQL: the database's name
    direct_url: str = ""  # PostgreSQL: past PgBouncer
    bouncer: PgBouncer | None = None
    migrated: str = ""  # the migrations' output


@pytest.fixture(scope="module")
def deployment(built: Built, pg_admin_url: str) -> Iterator[Deployment]:
    if not is_postgres(built.case):
        with containers.volume() as data:
            deployed = Deployment(env={}, volumes={data: SQLITE_DATA})
            yield migrated(built, deployed)
        return
    with scratch_database(pg_admin_url, "image") as database:
        direct_url = with_database(pg_admin_url, database)
        server = urlsplit(pg_admin_url)
        bouncer: PgBouncer | None = None
        if built.answers.get("db_pooler", NO_POOLER) != NO_POOLER:
            bouncer = PgBouncer(
                server_port=server.port or 5432,
                server_host=server.hostname or "127.0.0.1",
                pool_size=CONCURRENT_REQUESTS + 4,
            ).start()
        try:
            env = {"DATABASE_URL": bouncer.url(database) if bouncer else direct_url}
            if bouncer:
                env["DATABASE_MIGRATION_URL"] = direct_url
            deployed = Deployment(env, {}, database, direct_url, bouncer)
            yield migrated(built, deployed)
        finally:
            if bouncer is not None:
                bouncer.stop()


def migrated(built: Built, deployed: Deployment) -> Deployment:
    """`deployed` once the image ran its migrations (with PgBouncer, past it)."""
    result = containers.run_once(
        built.tag, "alembic", "upgrade", "head", env=deployed.env, volumes=deployed.volumes
    )
    deployed.migrated = result.stdout + result.stderr
    assert result.returncode == 0, deployed.migrated
    return deployed


@dataclass
class App:
    container: Container
    base_url: str
    ready_seconds: float


@contextlib.contextmanager
def running_app(built: Built, deployed: Deployment) -> Iterator[App]:
    """A container of the app on a free port, ready once /health/db answers 200; removed
    afterwards."""
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    env = {**deployed.env, "UVICORN_PORT": str(port)}
    with Container(built.tag, env=env, volumes=deployed.volumes) as container:
        started = time.monotonic()

        def ready() -> bool:
            if not container.running():
                raise AssertionError(f"the app container exited:\n{container.logs()[-4000:]}")
            try:
                return httpx.get(base_url + "/health/db", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, READY_TIMEOUT, "/health/db answers 200")
        yield App(container, base_url, time.monotonic() - started)


@pytest.fixture(scope="module")
def app(built: Built, deployment: Deployment) -> Iterator[App]:
    """The app, run from the image, shared by the tests that only send it requests."""
    with running_app(built, deployment) as running:
        yield running


def create_item(base_url: str, name: str) -> dict[str, Any]:
    created = httpx.post(base_url + "/items", json={"name": name, "price_cents": 42}, timeout=10)
    assert created.status_code == 201, created.text
    item: dict[str, Any] = created.json()
    return item


def backends(admin_url: str, database: str, waiting: bool = False) -> set[int]:
    """Pids of the server processes with the service's application_name in `database`,
    only those waiting on a lock when `waiting`."""
    query = "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s"
    if waiting:
        query += " AND wait_event_type = 'Lock'"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        return {row[0] for row in conn.execute(query, (database, APP_NAME)).fetchall()}


def pgbouncer_show(bouncer: PgBouncer, what: str, database: str) -> list[dict[str, Any]]:
    """The rows of SHOW `what` (CLIENTS, SERVERS) on PgBouncer's admin console that belong
    to `database`. Without parameters psycopg uses the simple query protocol, which is all
    the console speaks."""
    with psycopg.connect(bouncer.url("pgbouncer"), autocommit=True, connect_timeout=5) as conn:
        cursor = conn.execute(f"SHOW {what}")
        columns = [c.name for c in cursor.description or []]
        rows = [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]
    return [row for row in rows if row["database"] == database]


def pgbouncer_clients(bouncer: PgBouncer, database: str) -> set[tuple[str, int]]:
    """The address and port of each client of `database` at PgBouncer."""
    return {(row["addr"], row["port"]) for row in pgbouncer_show(bouncer, "CLIENTS", database)}


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
                body = {"name": f"held-{i}-{uuid.uuid4().hex[:8]}", "price_cents": i}
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


def in_container(container: Container, script: str) -> Any:
    """Run a Python `script` in the running container; the JSON it printed last."""
    result = container.exec("python", "-c", script)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("built", EVERY_CASE, indirect=True)
def test_a_second_build_comes_from_the_layer_cache(
    built: Built, record_property: Callable[[str, Any], None]
) -> None:
    cached, log = containers.build_image(built.root, built.tag, built.build_args)
    size = containers.image_size(built.tag)
    figures = (
        f"image {size / 1e6:.0f} MB, build cold {built.cold_seconds:.1f} s, cached {cached:.1f} s"
    )
    report(record_property, f"image {built.case}", figures)
    assert "Using cache" in log, log[-3000:]
    assert "Resolved" not in log, log[-3000:]  # uv did not run again


@pytest.mark.parametrize("built", EVERY_CASE, indirect=True)
def test_the_image_runs_uvicorn_as_a_non_root_user(built: Built) -> None:
    config = containers.image_inspect(built.tag)["Config"]
    user = config.get("User", "")
    assert user.split(":")[0] not in {"", "0", "root"}, f"image runs as {user!r}"
    env = dict(item.split("=", 1) for item in config.get("Env", []))
    grace = float(env["UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN"])
    assert 0 < grace < STOP_TIMEOUT - 1
    assert config["Cmd"][0] == "uvicorn"
    assert "--port" not in config["Cmd"]
    if is_postgres(built.case):
        assert "DATABASE_URL" not in env, env
        assert not config.get("Volumes"), config.get("Volumes")
    else:
        assert env["DATABASE_URL"] == f"sqlite:///{SQLITE_DATA}/{APP_NAME}.db", env
        assert set(config.get("Volumes") or {}) == {SQLITE_DATA}, config.get("Volumes")


@pytest.mark.parametrize("built", EVERY_CASE, indirect=True)
def test_the_image_migrates_the_database(built: Built, deployment: Deployment, app: App) -> None:
    assert "Running upgrade" in deployment.migrated, deployment.migrated
    if is_postgres(built.case):
        with psycopg.connect(deployment.direct_url, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute(
                "SELECT to_regclass('items') IS NOT NULL, (SELECT version_num FROM alembic_version)"
            ).fetchone()
        assert row is not None
        tables, revision = row
    else:
        # The file on the volume, as the running app sees it.
        tables, revision = in_container(
            app.container,
            "import json, sqlite3\n"
            f"db = sqlite3.connect('{SQLITE_DATA}/{APP_NAME}.db')\n"
            "tables = db.execute(\"SELECT count(*) FROM sqlite_master WHERE name = 'items'\")\n"
            "revision = db.execute('SELECT version_num FROM alembic_version')\n"
            "print(json.dumps([tables.fetchone()[0] == 1, revision.fetchone()[0]]))\n",
        )
    assert tables, "no items table"
    assert revision, "no revision in alembic_version"


@pytest.mark.parametrize("built", EVERY_CASE, indirect=True)
def test_the_image_healthcheck_finds_the_app(
    built: Built, app: App, record_property: Callable[[str, Any], None]
) -> None:
    report(
        record_property, f"image {built.case}", f"run to /health/db 200 {app.ready_seconds:.2f} s"
    )
    # The image's HEALTHCHECK, run on demand: it must find the app on UVICORN_PORT.
    health = containers.podman("healthcheck", "run", app.container.name, check=False)
    assert health.returncode == 0, health.stdout + health.stderr + app.container.logs()[-2000:]


@pytest.mark.parametrize("built", EVERY_CASE, indirect=True)
def test_the_app_writes_and_reads_items(built: Built, app: App) -> None:
    item = create_item(app.base_url, f"from the image {uuid.uuid4().hex[:8]}")
    read = httpx.get(f"{app.base_url}/items/{item['id']}", timeout=10)
    assert read.status_code == 200, read.text
    assert read.json() == item


@pytest.mark.parametrize("built", EVERY_CASE, indirect=True)
def test_the_app_runs_without_root_and_without_dev_tools(built: Built, app: App) -> None:
    uid = app.container.exec("id", "-u")
    assert uid.returncode == 0, uid
    assert uid.stdout.strip() not in {"", "0"}, uid
    # Dev-only distributions (the rendered dev group, less the runtime dependencies) and
    # dev programs.
    project = tomllib.loads((built.root / "pyproject.toml").read_text())
    runtime = {name_of(r).lower() for r in project["project"]["dependencies"]}
    dev_only = sorted(
        {name_of(r) for r in project["dependency-groups"]["dev"]} - runtime | {"pip", "uv"}
    )
    script = (
        "import importlib.metadata as m, json, shutil\n"
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
    assert in_container(app.container, script) == []


@pytest.mark.parametrize("built", POSTGRES_CASES, indirect=True)
def test_sigterm_answers_the_requests_held_in_the_database_then_exits(
    built: Built,
    deployment: Deployment,
    pg_admin_url: str,
    record_property: Callable[[str, Any], None],
) -> None:
    database, bouncer = deployment.database, deployment.bouncer
    # Connections of other containers of the service (the shared app's) are left out.
    others = backends(pg_admin_url, database)
    other_clients = pgbouncer_clients(bouncer, database) if bouncer else set()
    with running_app(built, deployment) as started:
        app, base_url = started.container, started.base_url
        # Hold every request in the database, then SIGTERM.
        with psycopg.connect(deployment.direct_url, connect_timeout=5) as locker:
            locker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
            held = HeldRequests(base_url, CONCURRENT_REQUESTS)
            held.start()
            wait_until(
                lambda: len(backends(pg_admin_url, database, waiting=True)) == CONCURRENT_REQUESTS,
                10,
                f"{CONCURRENT_REQUESTS} of the service's backends wait on the lock",
            )
            app.kill("TERM")
            signalled = time.monotonic()
            # Uvicorn stops listening at once, and keeps the held requests.
            wait_until(lambda: refused(base_url), 5, "new connections are refused after SIGTERM")
            assert app.running()
            assert held.pending() == CONCURRENT_REQUESTS, held.results
            held_for = time.monotonic() - signalled
            locker.rollback()  # releases the lock
            released = time.monotonic()
        exit_code = app.wait(timeout=STOP_TIMEOUT + 5)
        exited = time.monotonic()
        logs = app.logs()
        held.join(REQUEST_TIMEOUT)
    answered = sum(result == 201 for result in held.results)
    report(
        record_property,
        f"image {built.case}",
        f"SIGTERM to exit {exited - signalled:.2f} s (requests held {held_for:.2f} s of it, "
        f"last answer {max(held.done_at) - released:.2f} s after the release, "
        f"exit {exited - max(held.done_at):.2f} s after it), "
        f"requests answered {answered}/{CONCURRENT_REQUESTS}",
    )
    assert held.results == [201] * CONCURRENT_REQUESTS, held.results
    assert exit_code == 0, logs[-4000:]
    assert "Application shutdown complete" in logs, logs[-4000:]

    # No connection of the service is left: the lifespan closed the pool.
    if bouncer is None:
        wait_until(
            lambda: backends(pg_admin_url, database) <= others,
            5,
            f"no connection with application_name {APP_NAME} left in pg_stat_activity",
        )
    else:
        # Behind PgBouncer the service's connections end at PgBouncer: none may be left
        # there, and every server connection with the service's name is PgBouncer's own
        # pooled one (transaction pooling keeps them for the next client).
        wait_until(
            lambda: pgbouncer_clients(bouncer, database) <= other_clients,
            5,
            "no client connection of the service left at PgBouncer",
        )
        pooled = {s["remote_pid"] for s in pgbouncer_show(bouncer, "SERVERS", database)}
        assert backends(pg_admin_url, database) <= pooled


@pytest.mark.parametrize("built", SQLITE_CASES, indirect=True)
def test_the_data_on_the_volume_outlives_the_container(
    built: Built, deployment: Deployment
) -> None:
    with running_app(built, deployment) as first:
        item = create_item(first.base_url, f"kept on the volume {uuid.uuid4().hex[:8]}")
        # As `docker stop` does it: SIGTERM, a graceful shutdown, exit 0.
        exit_code = first.container.stop(STOP_TIMEOUT)
        logs = first.container.logs()
    assert exit_code == 0, logs[-4000:]
    assert "Application shutdown complete" in logs, logs[-4000:]

    with running_app(built, deployment) as second:
        read = httpx.get(f"{second.base_url}/items/{item['id']}", timeout=10)
    assert read.status_code == 200, read.text
    assert read.json() == item


def test_image_builds_from_a_committed_lock_and_refuses_a_stale_one(
    base_image: str, image_tag: str, tmp_path: Path, record_property: Callable[[str, Any], None]
) -> None:
    root = render(tmp_path / "service")
    run(["uv", "lock", "--quiet"], cwd=root, env=clean_env(), timeout=300)
    lock = tomllib.loads((root / "uv.lock").read_text())
    locked = {p["name"]: p["version"] for p in lock["package"] if "version" in p}

    build_args = {"PYTHON_IMAGE": containers.private_base(base_image, image_tag)}
    elapsed, _ = containers.build_image(root, image_tag, build_args)
    report(record_property, "image asyncpg with uv.lock", f"build {elapsed:.1f} s")
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
