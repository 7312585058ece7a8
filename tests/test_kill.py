"""A killed worker leaves nothing half-written: the rendered service, with a route that writes
two rows in the request's transaction and waits between them (tests/programs/
durability_scaffold.py), is killed (SIGKILL, no shutdown of any kind) while requests wait
between their writes; none of their rows is stored, and no client got a success. A control
case shows the check can fail: a handler that commits between its writes is left half done.

The test has a throwaway cluster of its own and runs the service under uvicorn as a
subprocess. Every wait is bounded in count and time.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from harness.services import (
    Service,
    copy_program,
    create_database,
    report,
    throwaway_cluster,
    wait_until,
    with_database,
)

PACKAGE = "my_service"
# The kill test: the service is killed KILLS times, each time with PARKED requests stopped
# between their two writes (a start of the service takes seconds on a busy machine, so the
# requests share the kills).
KILLS = 8
PARKED = 3
PARK_TIMEOUT = 20.0
SCAFFOLD_MODULE = "durability_scaffold"


def pair_parts(database_url: str, key: str) -> list[str]:
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        rows = conn.execute("SELECT part FROM pairs WHERE key = %s ORDER BY part", (key,))
        return [part for (part,) in rows.fetchall()]


def backend_state(database_url: str, pid: int) -> str | None:
    """The state of the server process `pid` (pg_stat_activity), None once it is gone."""
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
    return None if row is None else str(row[0])


def post_pair(base_url: str, key: str, commit_between: bool) -> str:
    """POST /pairs/{key}: its status, or the name of the transport error."""
    params = {"commit_between": "true"} if commit_between else {}
    try:
        response = httpx.post(f"{base_url}/pairs/{key}", params=params, timeout=PARK_TIMEOUT + 10)
    except httpx.TransportError as exc:
        return type(exc).__name__
    return str(response.status_code)


@dataclass
class Parked:
    """A request stopped between its two writes: its answer to come, the uvicorn process
    serving it and the server process of its connection."""

    key: str
    answer: Future[str]
    pid: int
    backend: int


def park(
    pool: ThreadPoolExecutor,
    service: Service,
    markers: Path,
    database_url: str,
    *,
    commit_between: bool = False,
) -> Parked:
    """Send a request to the scaffold route and wait until it has written its first row and
    its transaction sits idle, waiting to be released."""
    key = uuid.uuid4().hex
    answer = pool.submit(post_pair, service.base_url, key, commit_between)
    marker = markers / key
    wait_until(lambda: marker.exists() or answer.done(), PARK_TIMEOUT, f"the first write of {key}")
    assert not answer.done(), f"the request ended before its first write: {answer.result()}"
    written = json.loads(marker.read_text())
    # Deterministic: the first INSERT is done and the request waits, in its transaction
    # (with commit_between, the one its SELECT began after the commit).
    wait_until(
        lambda: backend_state(database_url, written["backend"]) == "idle in transaction",
        PARK_TIMEOUT,
        f"the connection of {key} idle in transaction",
    )
    return Parked(key, answer, written["pid"], written["backend"])


def kill_parked(service: Service, parked: list[Parked], database_url: str) -> list[str]:
    """SIGKILL the service while `parked` wait between their writes; the requests' answers,
    once the server has ended their connections."""
    assert service.proc is not None
    for request in parked:
        # Served by uvicorn, under `uv run` in the service's process group.
        assert os.getpgid(request.pid) == service.proc.pid, "the request is served elsewhere"
    service.kill()
    answers = [request.answer.result(timeout=PARK_TIMEOUT) for request in parked]
    wait_until(
        lambda: all(backend_state(database_url, r.backend) is None for r in parked),
        10,
        "the server ends the dead client's connections",
    )
    return answers


@pytest.mark.slow
def test_killed_worker_leaves_nothing_half_written(
    default_project: Path, tmp_path: Path, record_property: Callable[[str, Any], None]
) -> None:
    project = default_project
    copy_program(f"{SCAFFOLD_MODULE}.py", project / "src" / PACKAGE / f"{SCAFFOLD_MODULE}.py")
    markers = tmp_path / "markers"
    markers.mkdir()
    outcomes: Counter[str] = Counter()
    cut_short: list[str] = []
    started = time.perf_counter()
    with throwaway_cluster() as cluster, ThreadPoolExecutor(max_workers=PARKED + 1) as pool:
        create_database(cluster.url, "kills")
        database_url = with_database(cluster.url, "kills")
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute("CREATE TABLE pairs (key text, part text, PRIMARY KEY (key, part))")
        services: list[Service] = []

        def serve() -> Service:
            service = Service(
                project,
                tmp_path / f"uvicorn-{len(services)}.log",
                app=f"{PACKAGE}.{SCAFFOLD_MODULE}:app",
                DATABASE_URL=database_url,
                SCAFFOLD_MARKERS=str(markers),
            )
            services.append(service)
            service.start()
            return service

        try:
            for kill in range(KILLS):
                service = serve()
                control = None
                if kill == 0:
                    # Control: released, a request writes both rows and commits.
                    released = park(pool, service, markers, database_url)
                    httpx.post(f"{service.base_url}/pairs/{released.key}/release", timeout=10)
                    assert released.answer.result(timeout=PARK_TIMEOUT) == "201"
                    assert pair_parts(database_url, released.key) == ["a", "b"]
                    # Control: a handler that commits between its writes is left half done
                    # by the kill, so the check below can see a half-written pair.
                    control = park(pool, service, markers, database_url, commit_between=True)
                parked = [park(pool, service, markers, database_url) for _ in range(PARKED)]
                answers = kill_parked(
                    service, [*parked, *([control] if control else [])], database_url
                )
                outcomes.update(answers[: len(parked)])
                if control is not None:
                    assert pair_parts(database_url, control.key) == ["a"], "the control case"
                for request in parked:
                    parts = pair_parts(database_url, request.key)
                    assert parts != ["a"], f"row a without row b after a kill ({request.key})"
                    assert parts == [], f"rows {parts} of a transaction never committed"
                    cut_short.append(request.key)
        finally:
            for service in services:
                service.stop()

    elapsed = time.perf_counter() - started
    figures = (
        f"{KILLS} kills with {PARKED} requests each between their two writes: "
        f"{len(cut_short)} transactions cut short, none left a row; the clients saw "
        f"{dict(outcomes)}; with a commit between the writes the kill left row a alone; "
        f"{elapsed:.1f}s"
    )
    report(record_property, "kill", figures)
    # No client got a success for a transaction the kill cut short.
    assert "201" not in outcomes, figures
