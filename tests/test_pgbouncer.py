"""The rendered service behind a real PgBouncer in transaction mode.

`db_pooler=pgbouncer` must make the service work through a transaction pooler: no named
prepared statements, no startup parameters PgBouncer refuses, migrations over a direct
connection. The same load through PgBouncer with `db_pooler=none` must fail, which shows
that the mode is what makes the difference. Real processes only: PgBouncer as the postgres
user, the service under `uvicorn --workers 2`, HTTP over loopback. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import ssl
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from harness.pgbouncer import PgBouncer, require_pgbouncer
from harness.pgserver import free_port
from harness.rendering import clean_env, postgres_drivers, render
from harness.services import (
    UV_RUN,
    ConnectionSampler,
    migrate,
    run,
    running_service,
    scratch_database,
    wait_until,
    with_database,
)
from harness.system import MissingProgramError

DRIVERS = postgres_drivers()

BOUNCER_POOL_SIZE = 10
WORKERS = 2
POOL_SIZE = 5
MAX_OVERFLOW = 10
SEED_ITEMS = 50
LOAD_REQUESTS = 2000
LOAD_CONCURRENCY = 50
BUDGET_CONCURRENCY = 100
LOAD_REQUEST_TIMEOUT = 30.0
LOAD_TIMEOUT = 120.0
RENDERED_SUITE_TIMEOUT = 300.0

# What a transaction pooler does to named prepared statements: the next transaction runs on
# another server connection, where the name is unknown or already taken by another client.
PREPARED_STATEMENT_ERROR = re.compile(
    r'prepared statement "(?:__asyncpg_stmt_|_pg3_)[^"]*" (?:does not exist|already exists)'
    r"|DuplicatePreparedStatement|InvalidSQLStatementNameError|InvalidSqlStatementName"
)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str, str], Path]:
    """project(driver, pooler): one rendered and synced service per variant for the module,
    rendered on first use (tests only read it)."""
    roots: dict[tuple[str, str], Path] = {}

    def get(driver: str, pooler: str) -> Path:
        key = (driver, pooler)
        if key not in roots:
            root = render(
                tmp_path_factory.mktemp(f"pgbouncer-{driver}-{pooler}") / "service",
                db_driver=driver,
                db_pooler=pooler,
                migrations="alembic",
                with_example=True,
            )
            run(["uv", "sync", "--quiet"], root, clean_env())
            roots[key] = root
        return roots[key]

    return get


@pytest.fixture
def server(pg_admin_url: str) -> tuple[str, int]:
    parts = urlsplit(pg_admin_url)
    return parts.hostname or "127.0.0.1", parts.port or 5432


@pytest.fixture
def bouncer(server: tuple[str, int]) -> Iterator[PgBouncer]:
    """A PgBouncer of its own for each test, in front of the shared server."""
    try:
        require_pgbouncer()
    except MissingProgramError as exc:
        pytest.fail(str(exc), pytrace=False)
    host, port = server
    with PgBouncer(port, server_host=host, pool_size=BOUNCER_POOL_SIZE) as pgbouncer:
        yield pgbouncer


@pytest.fixture
def database(pg_admin_url: str) -> Iterator[str]:
    """A fresh database on the shared server, dropped afterwards."""
    with scratch_database(pg_admin_url, "svc_pgb") as name:
        yield name


def seed(direct_url: str) -> list[int]:
    """SEED_ITEMS items written straight to the server; their ids."""
    with psycopg.connect(direct_url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute(
            "INSERT INTO items (name, price_cents) "
            "SELECT 'seed-' || n, n FROM generate_series(1, %s) AS n RETURNING id",
            (SEED_ITEMS,),
        ).fetchall()
    return [int(row[0]) for row in rows]


@dataclass
class Load:
    requests: int
    concurrency: int
    elapsed: float = 0.0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    failed_bodies: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0

    @property
    def server_errors(self) -> int:
        return sum(count for code, count in self.statuses.items() if code >= 500)

    @property
    def non_2xx(self) -> dict[int, int]:
        return {code: n for code, n in self.statuses.items() if not 200 <= code < 300}

    def summary(self) -> str:
        return (
            f"{self.requests} requests at concurrency {self.concurrency} in "
            f"{self.elapsed:.2f}s = {self.rate:.0f} req/s; statuses {dict(self.statuses)}; "
            f"transport errors {dict(self.errors)}"
        )


async def generate_load(base_url: str, ids: list[int], requests: int, concurrency: int) -> Load:
    """`requests` requests over `concurrency` connections: nine in ten read an item, one in
    ten creates one. One single-connection client per worker, as in test_service_faults."""
    load = Load(requests, concurrency)
    numbers = itertools.count()  # shared: each request number is taken once
    run_id = uuid.uuid4().hex[:8]
    one_connection = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    tls = ssl.create_default_context()  # unused on plain HTTP, but built once, not per client

    async def worker(client: httpx.AsyncClient) -> None:
        for n in numbers:
            if n >= requests:
                return
            try:
                if n % 10 == 0:
                    body = {"name": f"load-{run_id}-{n}", "price_cents": n}
                    response = await client.post("/items", json=body)
                else:
                    response = await client.get(f"/items/{ids[n % len(ids)]}")
            except httpx.TransportError as exc:
                load.errors[type(exc).__name__] += 1
            else:
                load.statuses[response.status_code] += 1
                if response.status_code >= 500 and len(load.failed_bodies) < 20:
                    load.failed_bodies.append(response.text[:300])

    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(
                    base_url=base_url,
                    limits=one_connection,
                    timeout=LOAD_REQUEST_TIMEOUT,
                    verify=tls,
                )
            )
            for _ in range(concurrency)
        ]
        started = time.perf_counter()
        async with asyncio.timeout(LOAD_TIMEOUT):
            await asyncio.gather(*(worker(client) for client in clients))
        load.elapsed = time.perf_counter() - started
    return load


@dataclass
class Run:
    load: Load
    samples: list[int]
    log: str

    @property
    def peak(self) -> int:
        return max(self.samples, default=0)

    def summary(self) -> str:
        return (
            f"{self.load.summary()}; server connections: max {self.peak} "
            f"over {len(self.samples)} samples"
        )


def serve_and_load(
    root: Path,
    log_path: Path,
    pg_admin_url: str,
    database: str,
    database_url: str,
    concurrency: int,
    **env: str,
) -> Run:
    """The service under `uvicorn --workers 2` on `database_url`, the load, and the server's
    connections to `database` sampled meanwhile."""
    ids = seed(with_database(pg_admin_url, database))
    with running_service(
        root,
        log_path,
        workers=WORKERS,
        DATABASE_URL=database_url,
        DB_POOL_SIZE=str(POOL_SIZE),
        DB_MAX_OVERFLOW=str(MAX_OVERFLOW),
        **env,
    ) as service:
        sampler = ConnectionSampler(pg_admin_url, database)
        sampler.start()
        try:
            load = asyncio.run(generate_load(service.base_url, ids, LOAD_REQUESTS, concurrency))
        finally:
            samples = sampler.finish()
    return Run(load, samples, service.log())


def report(
    label: str, figures: str, record_property: Callable[[str, Any], None], run_: Run
) -> None:
    print(f"\n[{label}] {figures}")
    record_property("requests_per_second", round(run_.load.rate))
    record_property("max_connections", run_.peak)
    record_property("server_errors", run_.load.server_errors)


@pytest.mark.slow
@pytest.mark.parametrize("driver", DRIVERS)
def test_service_suite_passes_through_pgbouncer(
    project: Callable[[str, str], Path], bouncer: PgBouncer, driver: str
) -> None:
    """The rendered project's own tests, every database connection through PgBouncer."""
    root = project(driver, "pgbouncer")
    result = run(
        [*UV_RUN, "pytest", "-q", "-p", "no:cacheprovider"],
        root,
        clean_env(TEST_DATABASE_URL=bouncer.url("postgres")),
        timeout=RENDERED_SUITE_TIMEOUT,
    )
    last = result.strip().splitlines()[-1]
    print(f"\n[{driver}-pgbouncer] rendered suite: {last}")
    assert "passed" in last, result[-4000:]
    for word in ("skipped", "error", "failed", "xfail"):
        assert word not in last, f"{word} in the rendered suite's result: {last}\n{result[-4000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("driver", DRIVERS)
def test_load_through_pgbouncer_with_two_workers(
    project: Callable[[str, str], Path],
    bouncer: PgBouncer,
    database: str,
    pg_admin_url: str,
    tmp_path: Path,
    driver: str,
    record_property: Callable[[str, Any], None],
) -> None:
    root = project(driver, "pgbouncer")
    migrate(root, bouncer.url(database), DATABASE_DIRECT_URL=with_database(pg_admin_url, database))
    result = serve_and_load(
        root,
        tmp_path / "uvicorn.log",
        pg_admin_url,
        database,
        bouncer.url(database),
        LOAD_CONCURRENCY,
    )
    figures = f"{result.summary()}; PgBouncer pool {bouncer.pool_size}"
    report(f"{driver}-pgbouncer", figures, record_property, result)

    log = result.log
    assert "Traceback" not in log, f"a traceback in the uvicorn log:\n{log[-4000:]}"
    assert not result.load.errors, f"transport errors; {figures}\n{log[-3000:]}"
    assert not result.load.non_2xx, f"non-2xx responses; {figures}\n{log[-3000:]}"
    assert sum(result.load.statuses.values()) == LOAD_REQUESTS, figures
    assert len(result.samples) >= 10, f"too few samples to judge the pool: {figures}"
    assert 1 <= result.peak <= bouncer.pool_size, figures


@pytest.mark.slow
@pytest.mark.parametrize("driver", DRIVERS)
def test_without_pooler_mode_prepared_statements_fail(
    project: Callable[[str, str], Path],
    bouncer: PgBouncer,
    database: str,
    pg_admin_url: str,
    tmp_path: Path,
    driver: str,
    record_property: Callable[[str, Any], None],
) -> None:
    """The same load through PgBouncer, rendered with db_pooler=none: named prepared
    statements break. DB_STATEMENT_TIMEOUT=0, or PgBouncer would refuse every connection for
    the startup parameter: prepared statements are then the only difference."""
    root = project(driver, "none")
    # This variant has no DATABASE_DIRECT_URL: migrate on the server directly.
    migrate(root, with_database(pg_admin_url, database), DB_STATEMENT_TIMEOUT="0")
    result = serve_and_load(
        root,
        tmp_path / "uvicorn.log",
        pg_admin_url,
        database,
        bouncer.url(database),
        LOAD_CONCURRENCY,
        DB_STATEMENT_TIMEOUT="0",
    )
    evidence = Counter(m.group(0) for m in PREPARED_STATEMENT_ERROR.finditer(result.log))
    evidence.update(
        m.group(0)
        for body in result.load.failed_bodies
        for m in PREPARED_STATEMENT_ERROR.finditer(body)
    )
    # The statement names differ; count by kind.
    kinds = Counter(re.sub(r'"[^"]*"', '"..."', text) for text in evidence.elements())
    figures = f"{result.summary()}; prepared-statement error mentions: {dict(kinds)}"
    report(f"{driver}-none-through-pgbouncer", figures, record_property, result)

    assert result.load.server_errors > 0, f"no request failed without the pooler mode: {figures}"
    assert kinds, (
        f"no prepared-statement error in the log or responses: {figures}\n{result.log[-3000:]}"
    )


@pytest.mark.slow
def test_migrations_use_the_direct_url(
    project: Callable[[str, str], Path], database: str, pg_admin_url: str
) -> None:
    """DATABASE_URL points where nothing listens: only DATABASE_DIRECT_URL can have worked."""
    root = project("asyncpg", "pgbouncer")
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/{database}"
    direct_url = with_database(pg_admin_url, database)
    migrate(root, nowhere, DATABASE_DIRECT_URL=direct_url)
    with psycopg.connect(direct_url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT to_regclass('public.items') IS NOT NULL").fetchone()
        version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
    assert row == (True,), "no items table after `alembic upgrade head`"
    assert len(version) == 1, version


# Advisory lock the test holds to stop the probe revision where it wants it.
PROBE_LOCK_KEY = 4343
# A revision that records what its session holds, then waits for PROBE_LOCK_KEY.
SESSION_PROBE = f'''"""Record the migration's session."""

from alembic import op

revision = "0099"
down_revision = "{{head}}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE TABLE migration_session AS SELECT pg_backend_pid() AS pid, "
        "current_setting('lock_timeout') AS lock_timeout, "
        "current_setting('statement_timeout') AS statement_timeout, "
        "(SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid() "
        "AND locktype = 'advisory' AND granted) AS advisory_locks"
    )
    op.execute("SELECT pg_advisory_lock_shared({PROBE_LOCK_KEY})")
    op.execute("SELECT pg_advisory_unlock_shared({PROBE_LOCK_KEY})")


def downgrade() -> None:
    op.execute("DROP TABLE migration_session")
'''


def bouncer_clients(bouncer: PgBouncer, database: str) -> list[tuple[Any, ...]]:
    """PgBouncer's clients of `database` (its admin console's SHOW CLIENTS)."""
    with psycopg.connect(bouncer.url("pgbouncer"), autocommit=True, connect_timeout=5) as admin:
        cursor = admin.execute("SHOW CLIENTS")
        assert cursor.description is not None
        column = [c.name for c in cursor.description].index("database")
        return [row for row in cursor.fetchall() if row[column] == database]


@pytest.mark.slow
def test_migrations_hold_their_session_on_postgresql_itself(
    project: Callable[[str, str], Path], bouncer: PgBouncer, database: str, pg_admin_url: str
) -> None:
    """DATABASE_URL through PgBouncer, DATABASE_MIGRATION_URL to PostgreSQL: while a revision
    runs, PgBouncer has no client, and the revision's session holds the migration lock and the
    timeouts env.py set for it before the revision's transaction began."""
    root = project("asyncpg", "pgbouncer")
    direct_url = with_database(pg_admin_url, database)
    offline = run([*UV_RUN, "alembic", "upgrade", "head", "--sql"], root, clean_env())
    head = re.findall(r"Running upgrade \w* -> (\w+)", offline)[-1]
    probe = root / "migrations" / "versions" / "20991231_0099_session_probe.py"
    probe.write_text(SESSION_PROBE.format(head=head))
    env = clean_env(DATABASE_URL=bouncer.url(database), DATABASE_MIGRATION_URL=direct_url)
    try:
        with psycopg.connect(direct_url, autocommit=True, connect_timeout=5) as test:
            test.execute("SELECT pg_advisory_lock(%s)", (PROBE_LOCK_KEY,))
            migrator = subprocess.Popen(
                [*UV_RUN, "alembic", "upgrade", "head"],
                cwd=root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                waiting = (
                    "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                    "AND objid::bigint = %s AND database = "
                    "(SELECT oid FROM pg_database WHERE datname = current_database())"
                )
                wait_until(
                    lambda: test.execute(waiting, (PROBE_LOCK_KEY,)).fetchall(),
                    60,
                    "the migration waiting inside its revision",
                )
                clients = bouncer_clients(bouncer, database)
            finally:
                test.execute("SELECT pg_advisory_unlock(%s)", (PROBE_LOCK_KEY,))
            output = migrator.communicate(timeout=120)[0]
    finally:
        probe.unlink()
    assert migrator.returncode == 0, output
    assert clients == [], f"the migration went through PgBouncer: {clients}"
    with psycopg.connect(direct_url, autocommit=True, connect_timeout=5) as conn:
        session = conn.execute(
            "SELECT lock_timeout, statement_timeout, advisory_locks FROM migration_session"
        ).fetchall()
    assert session == [("5s", "1h", 1)], session


@pytest.mark.slow
def test_connection_budget_without_pooler_two_workers(
    project: Callable[[str, str], Path],
    database: str,
    pg_admin_url: str,
    tmp_path: Path,
    record_property: Callable[[str, Any], None],
) -> None:
    """Directly connected, each worker process keeps its own pool: the server sees at most
    workers x (pool size + overflow) connections."""
    root = project("asyncpg", "none")
    direct_url = with_database(pg_admin_url, database)
    migrate(root, direct_url)
    result = serve_and_load(
        root, tmp_path / "uvicorn.log", pg_admin_url, database, direct_url, BUDGET_CONCURRENCY
    )
    budget = WORKERS * (POOL_SIZE + MAX_OVERFLOW)
    figures = f"{result.summary()}; budget {WORKERS} x ({POOL_SIZE} + {MAX_OVERFLOW}) = {budget}"
    report("asyncpg-none-direct", figures, record_property, result)

    log = result.log
    assert "Traceback" not in log, f"a traceback in the uvicorn log:\n{log[-4000:]}"
    assert not result.load.errors, f"transport errors; {figures}\n{log[-3000:]}"
    assert not result.load.non_2xx, f"non-2xx responses; {figures}\n{log[-3000:]}"
    assert len(result.samples) >= 10, f"too few samples to judge the pool: {figures}"
    assert 1 <= result.peak <= budget, figures
