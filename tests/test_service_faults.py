"""The rendered service under uvicorn, against a real PostgreSQL, when the database goes
away and comes back, and under concurrent load.

Real processes only: a throwaway cluster that is stopped and started again, the service as a
subprocess, HTTP over loopback. Every wait is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.rendering import postgres_drivers
from harness.services import (
    ConnectionSampler,
    create_database,
    drive_load,
    migrate,
    render_synced,
    report,
    running_service,
    scratch_database,
    throwaway_cluster,
    wait_accepting,
    with_database,
)

# Trust authentication ignores it, so it can sit in DATABASE_URL and must never show up.
PASSWORD = "s3cret"
# A request while the database is down is answered, not left hanging: the client gives up
# after this many seconds, far more than an answer takes.
OUTAGE_ANSWER_SECONDS = 10.0
# How long to keep trying after a restart before giving up (bounds the loop, not the check).
RECOVERY_GIVE_UP_SECONDS = 30.0

POOL_SIZE = 5
MAX_OVERFLOW = 10
SEED_ITEMS = 50
LOAD_REQUESTS = 3000
LOAD_CONCURRENCY = 100
LOAD_REQUEST_TIMEOUT = 30.0
LOAD_TIMEOUT = 120.0


@pytest.fixture(scope="module", params=postgres_drivers())
def project(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One rendered and synced service per driver for the module (tests only read it)."""
    driver: str = request.param
    return render_synced(
        tmp_path_factory.mktemp(f"faults-{driver}") / "service",
        db_driver=driver,
        migrations="alembic",
        with_example=True,
    )


def assert_retry_after(response: httpx.Response, what: str) -> None:
    value = response.headers.get("Retry-After")
    assert value, f"{what}: 503 without a Retry-After header"
    if not value.strip().isdigit():  # delay-seconds, or else an HTTP date (RFC 9110 10.2.3)
        try:
            parsedate_to_datetime(value)
        except (TypeError, ValueError):
            pytest.fail(f"{what}: Retry-After is neither seconds nor an HTTP date: {value!r}")


def assert_unavailable(response: httpx.Response, what: str) -> None:
    """503 with a JSON body: never a 500 or a traceback (a hang fails the client)."""
    assert response.status_code == 503, (
        f"{what}: expected 503 while the database is down, got {response.status_code}: "
        f"{response.text[:500]}"
    )
    assert response.headers.get("content-type", "").startswith("application/json"), what
    body = response.json()
    assert isinstance(body, dict), f"{what}: {body!r}"
    assert "Traceback" not in response.text, f"{what}: {response.text[:500]}"


@pytest.mark.slow
def test_recovers_after_database_restart(
    project: Path, tmp_path: Path, record_property: Callable[[str, Any], None]
) -> None:
    log_path = tmp_path / "uvicorn.log"
    bodies: list[str] = []
    # Its own cluster: the shared server is never stopped.
    with throwaway_cluster() as cluster:
        admin_url = cluster.url
        create_database(admin_url, "faults")
        database_url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{cluster.port}/faults"
        migrate(project, database_url)

        with (
            running_service(project, log_path, DATABASE_URL=database_url) as service,
            httpx.Client(base_url=service.base_url, timeout=OUTAGE_ANSWER_SECONDS) as client,
        ):
            created = client.post("/items", json={"name": "survivor", "price_cents": 100})
            assert created.status_code == 201, created.text
            item_path = f"/items/{created.json()['id']}"
            assert client.get(item_path).status_code == 200
            assert client.get("/health/db").status_code == 200

            cluster.stop_server()

            # Twice round: first on pooled connections the restart broke, then on new ones.
            for attempt in range(2):
                calls: dict[str, Callable[[], httpx.Response]] = {
                    f"GET {item_path}": lambda: client.get(item_path),
                    "GET /items": lambda: client.get("/items"),
                    "POST /items": partial(
                        client.post,
                        "/items",
                        json={"name": f"during-outage-{attempt}", "price_cents": 1},
                    ),
                    "GET /health/db": lambda: client.get("/health/db"),
                }
                for what, call in calls.items():
                    response = call()
                    bodies.append(response.text)
                    assert_unavailable(response, f"{what} (round {attempt + 1})")
                    if what != "GET /health/db":
                        assert "detail" in response.json(), f"{what}: {response.text[:500]}"
                        assert_retry_after(response, what)

            cluster.start_server()
            wait_accepting(admin_url)
            accepted_at = time.perf_counter()

            statuses: list[int] = []
            for _ in range(500):
                response = client.get(item_path)
                recovery = time.perf_counter() - accepted_at
                statuses.append(response.status_code)
                bodies.append(response.text)
                if response.status_code == 200 or recovery > RECOVERY_GIVE_UP_SECONDS:
                    break
                assert response.status_code == 503, (
                    f"while recovering: {response.status_code}: {response.text[:500]}"
                )
                time.sleep(0.02)

            # A figure, not a check: bench/ measures recovery times.
            figure = f"recovery after restart: {recovery:.3f}s ({len(statuses)} requests)"
            report(record_property, project.parent.name, figure)
            assert response.status_code == 200, f"no recovery: {figure}, statuses {statuses}"
            assert response.json()["name"] == "survivor"

            health = client.get("/health/db")
            bodies.append(health.text)
            assert health.status_code == 200, health.text

    leaks = [body for body in bodies if PASSWORD in body]
    assert not leaks, f"the password appears in a response: {leaks[0][:500]}"
    log = log_path.read_text(errors="replace")
    assert PASSWORD not in log, "the password is in the uvicorn log"
    assert "Traceback" not in log, f"a traceback in the uvicorn log:\n{log[-4000:]}"


async def generate_load(base_url: str, ids: list[int]) -> tuple[Counter[int], Counter[str], float]:
    """LOAD_REQUESTS requests over LOAD_CONCURRENCY connections: nine in ten read an item,
    one in ten creates one. Returns status counts, transport error counts and the time taken.
    """
    statuses: Counter[int] = Counter()
    errors: Counter[str] = Counter()
    run_id = uuid.uuid4().hex[:8]

    async def send(client: httpx.AsyncClient, n: int) -> None:
        try:
            if n % 10 == 0:
                body = {"name": f"load-{run_id}-{n}", "price_cents": n}
                response = await client.post("/items", json=body)
            else:
                response = await client.get(f"/items/{ids[n % len(ids)]}")
        except httpx.TransportError as exc:
            errors[type(exc).__name__] += 1
        else:
            statuses[response.status_code] += 1

    elapsed = await drive_load(
        base_url,
        LOAD_REQUESTS,
        LOAD_CONCURRENCY,
        send,
        request_timeout=LOAD_REQUEST_TIMEOUT,
        timeout=LOAD_TIMEOUT,
    )
    return statuses, errors, elapsed


@pytest.mark.slow
def test_load_stays_within_the_pool(
    project: Path,
    tmp_path: Path,
    pg_admin_url: str,
    record_property: Callable[[str, Any], None],
) -> None:
    with scratch_database(pg_admin_url, "svc_faults") as name:
        database_url = with_database(pg_admin_url, name)
        migrate(project, database_url)
        with running_service(
            project,
            tmp_path / "uvicorn.log",
            DATABASE_URL=database_url,
            DB_POOL_SIZE=str(POOL_SIZE),
            DB_MAX_OVERFLOW=str(MAX_OVERFLOW),
        ) as service:
            with httpx.Client(base_url=service.base_url, timeout=10) as client:
                ids = []
                for n in range(SEED_ITEMS):
                    created = client.post("/items", json={"name": f"seed-{n}", "price_cents": n})
                    assert created.status_code == 201, created.text
                    ids.append(created.json()["id"])

            sampler = ConnectionSampler(pg_admin_url, name)
            sampler.start()
            try:
                statuses, errors, elapsed = asyncio.run(generate_load(service.base_url, ids))
            finally:
                samples = sampler.finish()
            log = service.log()

    rate = LOAD_REQUESTS / elapsed
    peak = max(samples, default=0)
    figures = (
        f"{LOAD_REQUESTS} requests in {elapsed:.2f}s = {rate:.0f} req/s; "
        f"connections: max {peak} over {len(samples)} samples; statuses {dict(statuses)}"
    )
    print(f"\n[{project.parent.name}] {figures}")
    record_property("requests_per_second", round(rate))
    record_property("max_connections", peak)

    assert "Traceback" not in log, f"a traceback in the uvicorn log:\n{log[-4000:]}"
    assert not errors, f"transport errors {dict(errors)}; {figures}\n{log[-3000:]}"
    failed = {code: count for code, count in statuses.items() if not 200 <= code < 300}
    assert not failed, f"non-2xx responses {failed}; {figures}\n{log[-3000:]}"
    assert sum(statuses.values()) == LOAD_REQUESTS, figures
    assert len(samples) >= 10, f"too few samples to judge the pool: {figures}"
    assert 1 <= peak <= POOL_SIZE + MAX_OVERFLOW, figures
