"""Tracing (tracing=true) read from a real run: the service under uvicorn sends its spans over
OTLP/HTTP to a receiver this test starts, which decodes them with the OpenTelemetry protocol's
own messages. Per driver: the span trees of a GET, a POST, a PATCH with If-Match, a 404, a
retried serialization failure (PostgreSQL's 40001, SQLite's lock) and, on PostgreSQL, a 503
while the database is down; the same through PgBouncer; the caller's trace continued; each
statement one span; no bound value, password or URL in anything exported; log lines and
exemplars pointing at exported spans. And a collector that is down: requests keep their
answers, one line is logged; one that never answers: the spans wait in a bounded queue, and
the service's memory stops growing under load (against a control without the bound).
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sqlite3
import subprocess
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest

from harness.otlp import CLIENT, SERVER, STATUS_ERROR, Collector, Span
from harness.pgbouncer import PgBouncer, require_pgbouncer
from harness.services import (
    DEFAULT_APP,
    Service,
    create_database,
    drive_load,
    migrate,
    render_synced,
    scratch_database,
    throwaway_cluster,
    wait_accepting,
    wait_until,
    with_database,
)
from harness.system import MissingProgramError

pytestmark = pytest.mark.slow

PASSWORD = "tr4ce-pw-" + uuid.uuid4().hex[:8]
# A body value: it reaches a bound parameter, never a span.
BODY_SECRET = "body-" + uuid.uuid4().hex[:12]
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
EXPORTER_LOGGER = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
TIMEOUT = 30.0


@pytest.fixture
def collector() -> Iterator[Collector]:
    with Collector() as receiver:
        yield receiver


class Requests:
    """Requests sent with an X-Request-ID of their own; their answers by that id."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.sent: dict[str, httpx.Response] = {}

    def send(self, method: str, path: str, **kwargs: Any) -> tuple[str, httpx.Response]:
        request_id = uuid.uuid4().hex
        headers = {"X-Request-ID": request_id, **kwargs.pop("headers", {})}
        response = self.client.request(method, path, headers=headers, **kwargs)
        self.sent[request_id] = response
        return request_id, response


def server_span(spans: list[Span], request_id: str) -> Span:
    (server,) = [
        s
        for s in spans
        if s.kind == SERVER
        and s.attributes.get("http.response.header.x-request-id") == [request_id]
    ]
    return server


def in_trace(spans: list[Span], server: Span) -> list[Span]:
    """The spans under `server` (its descendants), found by their parents."""
    below, frontier = [], {server.span_id}
    while frontier:
        found = [s for s in spans if s.parent_id in frontier]
        below += found
        frontier = {s.span_id for s in found}
    return below


def statements(spans: list[Span]) -> list[Span]:
    return [s for s in spans if s.kind == CLIENT]


def attempts(spans: list[Span]) -> list[Span]:
    return sorted(
        (s for s in spans if s.name == "run_in_transaction"),
        key=lambda s: int(s.attributes["db.transaction.attempt"]),
    )


@dataclass
class Database:
    """Where the service's data lives, and how the test holds a lock on an item's row."""

    url: str
    admin_url: str | None = None  # PostgreSQL: for pg_stat_activity
    path: Path | None = None  # SQLite: the file


def hold_and_release(database: Database, service: Service, item_id: int) -> Iterator[None]:
    """Hold the item's row (PostgreSQL) or the database (SQLite) while the caller's PATCH
    runs into it; release once its first attempt failed, so that the second succeeds."""
    if database.path is not None:
        writer = sqlite3.connect(database.path, isolation_level=None)
        writer.execute("BEGIN IMMEDIATE")
        yield
        # The first attempt ran past the busy timeout: "database is locked".
        wait_until(lambda: "transaction attempt 1 of 3 failed" in service.log(), TIMEOUT, "a retry")
        writer.execute("ROLLBACK")
        writer.close()
        return
    assert database.admin_url is not None
    with psycopg.connect(database.url) as holder:
        holder.execute("SELECT 1 FROM items WHERE id = %s FOR UPDATE", (item_id,))
        yield
        with psycopg.connect(database.admin_url, autocommit=True) as watcher:

            def patch_waits() -> bool:
                row = watcher.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE '%%FOR UPDATE%%' AND pid <> %s",
                    (holder.info.backend_pid,),
                ).fetchone()
                return row is not None and row[0] > 0

            wait_until(patch_waits, TIMEOUT, "the PATCH waits for the row")
        # Changed and committed after the PATCH's snapshot: its attempt fails with 40001.
        holder.execute("UPDATE items SET name = name || '-held' WHERE id = %s", (item_id,))
        holder.commit()


@dataclass
class Run:
    """A scenario's requests, its request ids by name, the trace ids of the exemplars it
    scraped, and the service, stopped."""

    requests: Requests
    named: dict[str, str]
    exemplars: set[str]
    service: Service


def run_scenario(
    root: Path, tmp_path: Path, database: Database, collector: Collector, **env: str
) -> Run:
    """Start the service, send every request of the scenario, stop it (which exports the
    spans still queued)."""
    # Every keyword of Service that is not a string is given, so `env` fills only variables.
    service = Service(
        root,
        tmp_path / "stdout.log",
        app=DEFAULT_APP,
        workers=1,
        uvicorn_args=(),
        stderr_path=tmp_path / "stderr.log",
        DATABASE_URL=database.url,
        LOG_FORMAT="json",
        DB_SLOW_QUERY_MS="0.001",  # every statement logged, with its ids
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
        **env,
    )
    named: dict[str, str] = {}
    try:
        service.start()
        with httpx.Client(base_url=service.base_url, timeout=TIMEOUT) as client:
            requests = Requests(client)
            body = {"name": "traced", "description": BODY_SECRET, "price_cents": 1}
            named["post"], created = requests.send("POST", "/items", json=body)
            assert created.status_code == 201, created.text
            item = f"/items/{created.json()['id']}"
            caller = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
            named["get"], got = requests.send("GET", item, headers=caller)
            assert got.status_code == 200, got.text
            change = {"json": {"description": BODY_SECRET + "-2"}}
            named["patch"], patched = requests.send(
                "PATCH", item, headers={"If-Match": got.headers["ETag"]}, **change
            )
            assert patched.status_code == 200, patched.text
            named["404"], missing = requests.send("GET", "/items/999999")
            assert missing.status_code == 404

            holding = hold_and_release(database, service, created.json()["id"])
            next(holding)
            with ThreadPoolExecutor(1) as pool:
                retried = pool.submit(requests.send, "PATCH", item, json={"price_cents": 2})
                next(holding, None)
                named["retried"], answer = retried.result(timeout=TIMEOUT)
            assert answer.status_code == 200, answer.text

            accept = {"Accept": "application/openmetrics-text; version=1.0.0"}
            scrape = client.get("/metrics", headers=accept)
            assert scrape.headers["content-type"].startswith("application/openmetrics-text")
            exemplars = set(re.findall(r' # \{trace_id="([0-9a-f]{32})"\}', scrape.text))
    finally:
        service.stop()
    return Run(requests, named, exemplars, service)


def check_scenario(run: Run, collector: Collector, driver: str) -> None:
    requests, named, service = run.requests, run.named, run.service
    spans = collector.received()
    assert spans, f"nothing exported:\n{service.log()[-3000:]}"
    servers = {request_id: server_span(spans, request_id) for request_id in requests.sent}

    # Named by route templates, never paths; FastAPI's HTTP attributes.
    for request_id, response in requests.sent.items():
        server = servers[request_id]
        method = response.request.method
        assert server.name == f"{method} /items" or server.name == f"{method} /items/{{item_id}}"
        assert server.attributes["http.response.status_code"] == response.status_code
        assert server.status != STATUS_ERROR, server
        assert server.resource["service.name"] == "my-service"
    get = servers[named["get"]]
    assert (get.trace_id, get.parent_id) == (CALLER_TRACE, CALLER_SPAN)

    # Each statement one span (one slow-query line per statement that succeeded), under
    # the request that sent it, with its database's attributes.
    lines = [json.loads(line) for line in service.log().splitlines()]
    for request_id, server in servers.items():
        below = in_trace(spans, server)
        sent = [
            r
            for r in lines
            if r["request_id"] == request_id and r["message"].startswith("slow query")
        ]
        ok = [s for s in statements(below) if s.status != STATUS_ERROR]
        assert len(ok) == len(sent), (request_id, [s.name for s in ok], sent)
        for statement in statements(below):
            system = "sqlite" if driver == "aiosqlite" else "postgresql"
            assert statement.attributes["db.system"] == system
            assert "db.statement" in statement.attributes
        # Every line the request logged carries its trace and one of its spans.
        ids = {server.span_id} | {s.span_id for s in below}
        for record in (r for r in lines if r["request_id"] == request_id):
            assert record["trace_id"] == server.trace_id, record
            assert record["span_id"] in ids, record
    assert statements(in_trace(spans, servers[named["post"]]))
    assert len(attempts(in_trace(spans, servers[named["patch"]]))) == 1

    # The retried PATCH: two attempts, the first failed by the database's code for it.
    first, second = attempts(in_trace(spans, servers[named["retried"]]))
    code = "SQLITE_BUSY" if driver == "aiosqlite" else "40001"
    assert first.status == STATUS_ERROR
    assert first.attributes["db.response.status_code"] == code
    assert second.status != STATUS_ERROR
    assert "db.response.status_code" not in second.attributes

    # Exemplars of the request histogram are traces the receiver got.
    assert run.exemplars
    assert run.exemplars <= {s.trace_id for s in spans}

    exported = repr([(s.name, s.attributes, s.events, s.status_message, s.resource) for s in spans])
    for secret in (PASSWORD, BODY_SECRET, "postgresql://", "sqlite+aiosqlite://"):
        assert secret not in exported
    assert service.stderr() == ""


@pytest.mark.parametrize("driver", ["asyncpg", "psycopg"])
def test_postgresql_requests_are_traced_into_their_statements(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, collector: Collector, driver: str
) -> None:
    root = render_synced(
        tmp_path_factory.mktemp(driver) / "service", db_driver=driver, tracing=True
    )
    with throwaway_cluster(password=PASSWORD) as cluster:
        create_database(cluster.url, "traced")
        url = with_database(cluster.url, "traced")
        migrate(root, url)
        database = Database(url=url, admin_url=cluster.url)
        run = run_scenario(
            root, tmp_path, database, collector, DB_ISOLATION_LEVEL="REPEATABLE READ"
        )
        check_scenario(run, collector, driver)

        # The database is down: 503, the request's span failed, the failure described.
        down = Service(
            root,
            tmp_path / "down.log",
            DATABASE_URL=url,
            OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
        )
        try:
            down.start()
            cluster.stop_server()
            with httpx.Client(base_url=down.base_url, timeout=TIMEOUT) as client:
                request_id = uuid.uuid4().hex
                answer = client.get("/items/1", headers={"X-Request-ID": request_id})
                assert answer.status_code == 503, answer.text
        finally:
            down.stop()
            cluster.start_server()
            wait_accepting(cluster.url)
    failed = server_span(collector.received(), request_id)
    assert failed.status == STATUS_ERROR
    assert failed.attributes["error.type"] == "503"
    ((name, exception),) = failed.events
    assert name == "exception"
    assert exception["exception.type"] == "sqlalchemy.exc.OperationalError"
    assert exception["exception.message"]
    assert PASSWORD not in repr(failed)
    assert "postgresql://" not in repr(failed)


def test_statements_through_pgbouncer_stay_with_their_request(
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    collector: Collector,
    pg_admin_url: str,
) -> None:
    """Behind PgBouncer in transaction mode, where each transaction may get another server
    connection, every statement span is still under the request that sent it."""
    try:
        require_pgbouncer()
    except MissingProgramError as exc:
        pytest.fail(str(exc), pytrace=False)
    root = render_synced(
        tmp_path_factory.mktemp("pooled") / "service", db_pooler="pgbouncer", tracing=True
    )
    server = urlsplit(pg_admin_url)
    with (
        scratch_database(pg_admin_url, "traced_pgb") as name,
        PgBouncer(server.port or 5432, server_host=server.hostname or "127.0.0.1") as bouncer,
    ):
        # Migrations go to PostgreSQL directly; requests through PgBouncer.
        migrate(root, with_database(pg_admin_url, name))
        database = Database(url=bouncer.url(name), admin_url=pg_admin_url)
        run = run_scenario(
            root, tmp_path, database, collector, DB_ISOLATION_LEVEL="REPEATABLE READ"
        )
    check_scenario(run, collector, "asyncpg")


def test_sqlite_requests_are_traced_into_their_statements(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, collector: Collector
) -> None:
    root = render_synced(
        tmp_path_factory.mktemp("sqlite") / "service", db_driver="aiosqlite", tracing=True
    )
    path = tmp_path / "traced.db"
    url = f"sqlite+aiosqlite:///{path}"
    migrate(root, url)
    run = run_scenario(root, tmp_path, Database(url=url, path=path), collector)
    check_scenario(run, collector, "aiosqlite")


def test_a_collector_that_is_down_costs_one_line(
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    collector: Collector,
    pg_admin_url: str,
) -> None:
    """Exports fail while requests go on with their answers; the exporter's lines of the
    whole outage come down to one. Once the collector is back, spans arrive again."""
    root = render_synced(tmp_path_factory.mktemp("down") / "service", tracing=True)
    collector.down = True
    service = Service(
        root,
        tmp_path / "stdout.log",
        stderr_path=tmp_path / "stderr.log",
        DATABASE_URL=pg_admin_url,
        LOG_FORMAT="json",
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="50",  # an export attempt every 50 ms
        OTEL_EXPORTER_OTLP_TIMEOUT="1",
    )
    try:
        service.start()
        with httpx.Client(base_url=service.base_url, timeout=TIMEOUT) as client:

            def failed_exports_go_on() -> bool:
                assert client.get("/health").status_code == 200
                return collector.attempts >= 8

            wait_until(failed_exports_go_on, TIMEOUT, "eight failed export attempts")
            collector.down = False
            marker = uuid.uuid4().hex
            assert client.get("/health", headers={"X-Request-ID": marker}).status_code == 200

            def exported_again() -> bool:
                return any(
                    s.attributes.get("http.response.header.x-request-id") == [marker]
                    for s in collector.received()
                )

            wait_until(exported_again, TIMEOUT, "the spans of a request after the outage")
    finally:
        service.stop()
    records = [json.loads(line) for line in service.log().splitlines()]
    exporter = [r for r in records if r["logger"] == EXPORTER_LOGGER]
    assert len(exporter) == 1, exporter
    assert exporter[0]["level"] in {"WARNING", "ERROR"}
    assert service.stderr() == ""


# Requests per load round of the next test, and the growth of the service's resident memory
# over its last two rounds that tells a bounded span queue from one that keeps every span.
ROUND_REQUESTS = 1500
GROWTH_LIMIT_KIB = 4 * 1024


def resident_kib(service: Service) -> int:
    """The resident memory of the service's largest process (uvicorn's, under `uv run`)."""
    assert service.proc is not None
    sizes = subprocess.run(
        ["ps", "-o", "rss=", "--sid", str(service.proc.pid)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return max(int(size) for size in sizes)


@pytest.mark.parametrize(
    ("queue", "bounded"), [(512, True), (1_000_000, False)], ids=["bounded", "control"]
)
def test_a_collector_that_never_answers_leaves_memory_bounded(
    tmp_path_factory: pytest.TempPathFactory,
    tmp_path: Path,
    pg_admin_url: str,
    queue: int,
    bounded: bool,
) -> None:
    """A collector that takes the connection and never answers, as behind a firewall that
    drops: every request keeps its answer while the spans wait in OTEL_BSP_MAX_QUEUE_SIZE,
    and once the queue is full the service's memory stops growing. The control, a queue
    larger than the whole run, grows with every request: what the bound prevents."""
    root = render_synced(tmp_path_factory.mktemp("silent") / "service", tracing=True)
    statuses: Counter[int] = Counter()

    async def get(client: httpx.AsyncClient, _n: int) -> None:
        statuses[(await client.get("/items/1")).status_code] += 1

    with (
        scratch_database(pg_admin_url, "traced_silent") as name,
        socket.create_server(("127.0.0.1", 0), backlog=1) as silent,
    ):
        migrate(root, with_database(pg_admin_url, name))
        service = Service(
            root,
            tmp_path / "stdout.log",
            stderr_path=tmp_path / "stderr.log",
            DATABASE_URL=with_database(pg_admin_url, name),
            LOG_FORMAT="json",
            OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{silent.getsockname()[1]}",
            OTEL_EXPORTER_OTLP_TIMEOUT="600",  # each export waits for the whole test
            OTEL_BSP_MAX_QUEUE_SIZE=str(queue),
        )
        resident = []
        try:
            service.start()
            item = {"name": "one", "price_cents": 1}
            created = httpx.post(f"{service.base_url}/items", json=item, timeout=TIMEOUT)
            assert created.status_code == 201, created.text
            assert created.json()["id"] == 1
            for _ in range(3):
                load = drive_load(
                    service.base_url, ROUND_REQUESTS, 16, get, request_timeout=TIMEOUT, timeout=300
                )
                asyncio.run(load)
                resident.append(resident_kib(service))
        finally:
            service.stop()
    assert statuses == {200: 3 * ROUND_REQUESTS}
    growth = resident[2] - resident[1]
    if bounded:
        assert growth < GROWTH_LIMIT_KIB, f"resident KiB after each round: {resident}"
        records = [json.loads(line) for line in service.log().splitlines()]
        # One line for the whole outage, where the SDK writes one every 20 s.
        dropping = [r for r in records if r["message"].startswith("Queue full")]
        assert len(dropping) == 1, dropping
    else:
        assert growth > GROWTH_LIMIT_KIB, f"resident KiB after each round: {resident}"
    assert service.stderr() == ""
