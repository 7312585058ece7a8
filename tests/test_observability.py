"""What the rendered service tells its operators, read from a real run: every line of its
output as JSON (LOG_FORMAT=json) with the request's id, and GET /metrics parsed as Prometheus
does while the pool runs dry and while the database is down.

Each test has a throwaway cluster of its own (its server is stopped; the shared one never
is) and runs the service under uvicorn as a subprocess. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.services import (
    Service,
    create_database,
    drive_load,
    migrate,
    render_synced,
    report,
    throwaway_cluster,
    wait_accepting,
    wait_until,
    with_database,
)

# Fields every JSON line must have (docs/database/observability.md).
REQUIRED_FIELDS = ("time", "level", "logger", "message")
# What uvicorn itself logs over a run, start to shutdown.
UVICORN_LINES = (
    "Started server process",
    "Waiting for application startup.",
    "Application startup complete.",
    "Uvicorn running on",
    "Shutting down",
    "Waiting for application shutdown.",
    "Application shutdown complete.",
    "Finished server process",
)

POOL_SIZE = 2
MAX_OVERFLOW = 1
LOAD_REQUESTS = 120
LOAD_CONCURRENCY = 12
LOAD_TIMEOUT = 60.0
SCRAPE_TIMEOUT = 15.0


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default service (asyncpg, Alembic, the example, metrics), rendered and synced
    once for the module."""
    return render_synced(
        tmp_path_factory.mktemp("observability") / "service",
        db_driver="asyncpg",
        migrations="alembic",
        with_example=True,
        metrics=True,
    )


# -- 4. LOG_FORMAT=json ----------------------------------------------------------------


class Requests:
    """Requests sent with an X-Request-ID of their own, and what they were answered."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self.sent: list[tuple[str, str, str, int]] = []  # request id, method, path, status

    def send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        request_id = str(uuid.uuid4())
        response = self.client.request(method, path, headers={"X-Request-ID": request_id}, **kwargs)
        assert response.headers.get("X-Request-ID") == request_id, response.headers
        self.sent.append((request_id, method, path, response.status_code))
        return response


def parse_lines(output: str) -> list[dict[str, Any]]:
    """Every line as a JSON object with the required fields; fails on the first that is not."""
    records = []
    for number, line in enumerate(output.splitlines(), 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"stdout line {number} is not JSON: {line[:500]!r}")
        assert isinstance(record, dict), f"line {number}: {line[:500]!r}"
        missing = [f for f in REQUIRED_FIELDS if not isinstance(record.get(f), str)]
        assert not missing, f"line {number} lacks {missing}: {line[:500]!r}"
        # No terminal colour codes (uvicorn's color_message) in a machine's log.
        colored = [key for key, value in record.items() if "\x1b" in str(value)]
        assert not colored, f"line {number}: colour codes in {colored}: {line[:500]!r}"
        datetime.fromisoformat(record["time"])
        records.append(record)
    return records


@pytest.mark.slow
def test_every_line_is_json_with_the_request_id(
    project: Path, tmp_path: Path, record_property: Callable[[str, Any], None]
) -> None:
    with throwaway_cluster() as cluster:
        create_database(cluster.url, "logs")
        database_url = with_database(cluster.url, "logs")
        migrate(project, database_url)
        service = Service(
            project,
            tmp_path / "stdout.log",
            stderr_path=tmp_path / "stderr.log",
            DATABASE_URL=database_url,
            LOG_FORMAT="json",
            LOG_LEVEL="DEBUG",
            DB_ECHO="true",
            # Every statement is a slow one: each request's statements are logged.
            DB_SLOW_QUERY_MS="0.001",
        )
        try:
            service.start()
            with httpx.Client(base_url=service.base_url, timeout=10) as client:
                requests = Requests(client)
                body = {"name": "logged", "description": "two\nlines", "price_cents": 1}
                created = requests.send("POST", "/items", json=body)
                assert created.status_code == 201, created.text
                item = f"/items/{created.json()['id']}"
                assert requests.send("GET", item).status_code == 200
                assert requests.send("GET", "/items").status_code == 200
                assert requests.send("POST", "/items", json=body).status_code == 409
                assert requests.send("GET", "/health/db").status_code == 200

                cluster.stop_server()
                response = requests.send("POST", "/items", json={**body, "name": "outage"})
                assert response.status_code == 503, response.text
                for path in (item, "/health/db"):
                    assert requests.send("GET", path).status_code == 503

                cluster.start_server()
                wait_accepting(cluster.url)
                wait_until(lambda: requests.send("GET", item).status_code == 200, 15, "recovery")
                again = requests.send("POST", "/items", json={**body, "name": "again"})
                assert again.status_code == 201, again.text
        finally:
            service.stop()

    stdout, stderr = service.log(), service.stderr()
    records = parse_lines(stdout)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_id.setdefault(str(record.get("request_id")), []).append(record)

    for request_id, method, path, status in requests.sent:
        lines = by_id.get(request_id, [])
        loggers = Counter(r["logger"] for r in lines)
        what = f"{method} {path} ({status}, {request_id}): {lines}"
        access = f'"{method} {path} HTTP/1.1" {status}'
        assert any(access in r["message"] for r in lines if r["logger"] == "uvicorn.access"), what
        if path.startswith("/items") and status != 503:
            assert loggers["sqlalchemy.engine.Engine"], what  # DB_ECHO
        if path.startswith("/items") and status in {200, 201}:
            # A statement that fails (the 409) is not logged as slow, by design.
            assert any(r["message"].startswith("slow query: ") for r in lines), what
        if path.startswith("/items") and status == 503:
            assert any("database unavailable" in r["message"] for r in lines), what
        if path == "/health/db" and status == 503:
            assert any("database check failed" in r["message"] for r in lines), what
    ours = {request_id for request_id, *_ in requests.sent}
    for request_id, lines in by_id.items():
        if request_id in ours or request_id == "-":
            continue
        # Sent without an id: the harness's readiness probe, with an id generated for it.
        assert all('"GET /health HTTP/1.1"' in r["message"] for r in lines), lines

    uvicorn = [r["message"] for r in records if r["logger"].startswith("uvicorn.error")]
    for expected in UVICORN_LINES:
        assert any(m.startswith(expected) for m in uvicorn), f"no {expected!r} in {uvicorn}"
    # Start-up and shutdown lines belong to no request.
    assert all(r["request_id"] == "-" for r in records if r["logger"] == "uvicorn.error"), (
        "a uvicorn line outside requests with a request id"
    )
    # Everything goes to stdout: stderr stays empty.
    assert stderr == "", f"stderr holds: {stderr[:2000]}"

    loggers = Counter(r["logger"] for r in records)
    figures = (
        f"{len(records)} stdout lines, all JSON, {len(requests.sent)} requests with an id; "
        f"lines by logger {dict(loggers)}; stderr {len(stderr)} bytes"
    )
    report(record_property, "json logs", figures)


# -- 5. GET /metrics -------------------------------------------------------------------


def scrape(client: httpx.Client) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """GET /metrics, parsed by Prometheus' own parser: sample name and labels -> value."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain"), response.headers
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    """The sample's value; fails when it is missing."""
    key = (name, frozenset(labels.items()))
    assert key in samples, f"no {name}{labels} in {sorted(n for n, _ in samples)}"
    return samples[key]


def primary(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> float:
    """The value of a database metric's sample for the primary's engine."""
    return value(samples, name, engine="primary")


def requests_by_route(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float],
) -> Counter[tuple[str, str, str]]:
    """The requests answered (the duration histogram's count) by method, route and status."""
    counts: Counter[tuple[str, str, str]] = Counter()
    for (name, labels), count in samples.items():
        if name == "http_request_duration_seconds_count":
            label = dict(labels)
            counts[label["method"], label["route"], label["status"]] += int(count)
    return counts


@pytest.mark.slow
def test_metrics_show_pool_exhaustion_and_outage(
    project: Path, tmp_path: Path, record_property: Callable[[str, Any], None]
) -> None:
    with throwaway_cluster() as cluster:
        create_database(cluster.url, "metrics")
        database_url = with_database(cluster.url, "metrics")
        migrate(project, database_url)
        service = Service(
            project,
            tmp_path / "uvicorn.log",
            DATABASE_URL=database_url,
            DB_POOL_SIZE=str(POOL_SIZE),
            DB_MAX_OVERFLOW=str(MAX_OVERFLOW),
            DB_POOL_TIMEOUT="30",
        )
        try:
            service.start()
            with (
                httpx.Client(base_url=service.base_url, timeout=10) as client,
                ThreadPoolExecutor(max_workers=1) as pool,
            ):
                ids = []
                for n in range(5):
                    created = client.post("/items", json={"name": f"seed-{n}", "price_cents": n})
                    assert created.status_code == 201, created.text
                    ids.append(created.json()["id"])
                idle = scrape(client)
                assert primary(idle, "db_pool_size") == POOL_SIZE
                assert primary(idle, "db_pool_checked_out") == 0

                # Requests are slow while the table is locked: each holds its connection,
                # and the rest wait for one.
                statuses: Counter[int] = Counter()
                during: list[dict[tuple[str, frozenset[tuple[str, str]]], float]] = []

                async def send(client: httpx.AsyncClient, n: int) -> None:
                    if n % 4 == 0:
                        body = {"name": f"load-{n}", "price_cents": n}
                        response = await client.post("/items", json=body)
                    else:
                        response = await client.get(f"/items/{ids[n % len(ids)]}")
                    statuses[response.status_code] += 1

                with psycopg.connect(database_url, connect_timeout=5) as locker:
                    locker.execute("LOCK TABLE items IN ACCESS EXCLUSIVE MODE")
                    load = pool.submit(
                        asyncio.run,
                        drive_load(
                            service.base_url,
                            LOAD_REQUESTS,
                            LOAD_CONCURRENCY,
                            send,
                            request_timeout=LOAD_TIMEOUT,
                            timeout=LOAD_TIMEOUT,
                        ),
                    )

                    def exhausted() -> bool:
                        during.append(scrape(client))
                        checked_out = primary(during[-1], "db_pool_checked_out")
                        return checked_out == POOL_SIZE + MAX_OVERFLOW

                    wait_until(exhausted, SCRAPE_TIMEOUT, "the pool runs dry", 0.05)
                    locker.commit()
                load.result(timeout=LOAD_TIMEOUT)
                after = scrape(client)

                # The database goes away: requests fail and the failures are counted.
                cluster.stop_server()
                outage = [client.get(f"/items/{ids[0]}").status_code for _ in range(3)]
                outage += [client.post("/items", json={"name": "x", "price_cents": 1}).status_code]
                down = scrape(client)
                client.get("/no-such-route-42")
                final = scrape(client)
        finally:
            service.stop()

    busiest = during[-1]
    failures = "db_connection_failures_total"
    figures = (
        f"{LOAD_REQUESTS} requests, {LOAD_CONCURRENCY} at a time, pool {POOL_SIZE}+"
        f"{MAX_OVERFLOW}: {len(during)} scrapes until dry, then checked out "
        f"{primary(busiest, 'db_pool_checked_out'):.0f}, overflow "
        f"{primary(busiest, 'db_pool_overflow'):.0f}; afterwards checked out "
        f"{primary(after, 'db_pool_checked_out'):.0f}; connection failures "
        f"{primary(after, failures):.0f} -> {primary(down, failures):.0f} in the outage; "
        f"statuses {dict(statuses)}"
    )
    report(record_property, "metrics", figures)

    assert set(statuses) == {200, 201}, figures
    assert primary(busiest, "db_pool_overflow") == MAX_OVERFLOW, figures
    assert primary(after, "db_pool_checked_out") == 0, figures
    assert primary(after, "db_pool_overflow") == 0, figures

    assert outage == [503, 503, 503, 503], outage
    assert primary(down, failures) > primary(after, failures)

    # Counted by route template, never by path; a path no route serves is "unmatched".
    counts = requests_by_route(final)
    gets = sum(1 for n in range(LOAD_REQUESTS) if n % 4)
    posts = LOAD_REQUESTS - gets
    assert counts["GET", "/items/{item_id}", "200"] == gets, counts
    assert counts["GET", "/items/{item_id}", "503"] == 3, counts
    assert counts["POST", "/items", "201"] == posts + len(ids), counts
    assert counts["POST", "/items", "503"] == 1, counts
    assert counts["GET", "unmatched", "404"] == 1, counts
    assert counts["GET", "/metrics", "200"] >= len(during) + 3, counts
    routes = {route for _, route, _ in counts}
    assert routes <= {"/items", "/items/{item_id}", "/metrics", "/health", "unmatched"}, routes
