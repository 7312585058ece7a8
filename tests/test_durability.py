"""What the rendered service promises about data and secrets when things go wrong, with real
processes: PostgreSQL crashed under a write load, the service killed in the middle of a
transaction, and the service's output, answers and errors searched for its passwords.

Each test has a throwaway cluster of its own (the shared server is never stopped or crashed)
and runs the service under uvicorn as a subprocess. Every wait is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest
from psycopg import sql

from harness.rendering import clean_env
from harness.services import (
    UV_RUN,
    RestartableCluster,
    Service,
    create_database,
    drive_load,
    migrate,
    render_synced,
    report,
    run,
    throwaway_cluster,
    wait_accepting,
    wait_until,
    with_database,
)

PACKAGE = "my_service"
# Answers a request may get while the database crashes and recovers; a 500, a reset or a
# dropped connection is a failure.
EXPECTED_STATUSES = frozenset({201, 409, 503, 504})

# The crash test: a bounded POST load, PostgreSQL crashed (immediate stop) twice during it.
CRASH_REQUESTS = 3000
CRASH_CONCURRENCY = 32
CRASHES = 2
# Items created before each crash (counted from the start, or from the previous recovery).
CREATED_BEFORE_CRASH = 400
# Outage answers to see before the server is started again.
OUTAGE_ANSWERS = 50
REQUEST_TIMEOUT = 30.0
LOAD_TIMEOUT = 150.0
CONTROL_TIMEOUT = 60.0
# From "the server accepts connections" to the first 201.
RECOVERY_SECONDS = 3.0

# The kill test: the service is killed KILLS times, each time with PARKED requests stopped
# between their two writes (a start of the service takes seconds on a busy machine, so the
# requests share the kills).
KILLS = 8
PARKED = 3
PARK_TIMEOUT = 20.0
SCAFFOLD_MODULE = "durability_scaffold"
# Test scaffolding, not template code: the service's own app with one more route, which
# writes two rows in the request's transaction (SessionDep) and waits between them until
# released. After the first write it leaves a marker file with its process id and the
# server process id of its connection.
SCAFFOLD = '''\
"""Test scaffolding: a route that writes two rows in one transaction, waiting between them."""

import asyncio
import json
import os
from pathlib import Path

from sqlalchemy import text

from .api.deps import SessionDep
from .main import create_app

MARKERS = Path(os.environ["SCAFFOLD_MARKERS"])
app = create_app()
released: dict[str, asyncio.Event] = {}


@app.post("/pairs/{key}", status_code=201)
async def write_pair(key: str, session: SessionDep, commit_between: bool = False) -> dict[str, str]:
    insert = text("INSERT INTO pairs (key, part) VALUES (:key, :part)")
    await session.execute(insert, {"key": key, "part": "a"})
    if commit_between:  # the broken handler of the control case
        await session.commit()
    backend = await session.scalar(text("SELECT pg_backend_pid()"))
    marker = MARKERS / key
    partial = marker.with_suffix(".partial")
    partial.write_text(json.dumps({"pid": os.getpid(), "backend": backend}))
    partial.rename(marker)
    async with asyncio.timeout(60):
        await released.setdefault(key, asyncio.Event()).wait()
    await session.execute(insert, {"key": key, "part": "b"})
    return {"key": key}


@app.post("/pairs/{key}/release", status_code=204)
async def release(key: str) -> None:
    released.setdefault(key, asyncio.Event()).set()
'''

# A URL with credentials (scheme://user@ or scheme://user:password@).
FULL_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@'\"]+@")


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default service (asyncpg, Alembic, the example), rendered and synced once for the
    module. The kill test adds its scaffold module to it; the other tests never import it."""
    return render_synced(
        tmp_path_factory.mktemp("durability") / "service",
        db_driver="asyncpg",
        migrations="alembic",
        with_example=True,
    )


async def until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition()` in the event loop until it is true; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)


# -- 1. acknowledged writes survive a crash --------------------------------------------


@dataclass
class Answer:
    """What one POST /items got, and when it was done (time.perf_counter())."""

    n: int
    status: int | None  # None: no HTTP answer (transport error)
    error: str | None
    body: Any
    done_at: float
    request_id: str = "-"  # X-Request-ID: finds the request's lines in the service's log


@dataclass
class Crash:
    crashed_at: float
    accepted_at: float = 0.0  # the server accepts connections again
    first_created_at: float = 0.0  # the first 201 done after that

    @property
    def recovery(self) -> float:
        return self.first_created_at - self.accepted_at


def item_body(run_id: str, n: int) -> dict[str, Any]:
    """A body of its own for each request: name, description and price all differ."""
    return {
        "name": f"crash-{run_id}-{n}",
        "description": f"sent as request {n} of {run_id}, ü €",
        "price_cents": 1000 + 7 * n,
    }


async def post_under_crashes(
    base_url: str, cluster: RestartableCluster, run_id: str
) -> tuple[list[Answer], list[Crash], float]:
    """CRASH_REQUESTS POST /items over CRASH_CONCURRENCY connections, while PostgreSQL is
    crashed and started again CRASHES times: each crash once CREATED_BEFORE_CRASH items were
    created since the start or the last recovery, each start once OUTAGE_ANSWERS requests
    were answered after the crash."""
    answers: list[Answer] = []
    crashes: list[Crash] = []
    finished = asyncio.Event()

    async def send(client: httpx.AsyncClient, n: int) -> None:
        status = error = body = None
        request_id = "-"
        try:
            response = await client.post("/items", json=item_body(run_id, n))
        except httpx.TransportError as exc:
            error = f"{type(exc).__name__}: {exc}"
        else:
            status = response.status_code
            body = response.json() if status == 201 else response.text[:500]
            request_id = response.headers.get("X-Request-ID", "-")
        answers.append(Answer(n, status, error, body, time.perf_counter(), request_id))

    def created_since(mark: int) -> int:
        return sum(1 for answer in answers[mark:] if answer.status == 201)

    async def crash_and_restart() -> None:
        mark = 0
        for number in range(1, CRASHES + 1):
            await until(
                lambda mark=mark: created_since(mark) >= CREATED_BEFORE_CRASH or finished.is_set(),
                CONTROL_TIMEOUT,
                f"{CREATED_BEFORE_CRASH} items created before crash {number}",
            )
            assert not finished.is_set(), f"the load ended before crash {number}"
            crash = Crash(crashed_at=time.perf_counter())
            await asyncio.to_thread(cluster.crash_server)
            crashes.append(crash)
            mark = len(answers)
            await until(
                lambda mark=mark: len(answers) - mark >= OUTAGE_ANSWERS or finished.is_set(),
                CONTROL_TIMEOUT,
                f"{OUTAGE_ANSWERS} answers after crash {number}",
            )
            await asyncio.to_thread(cluster.start_server)
            await asyncio.to_thread(wait_accepting, cluster.url)
            crash.accepted_at = time.perf_counter()
            mark = len(answers)

    async def load() -> float:
        try:
            return await drive_load(
                base_url,
                CRASH_REQUESTS,
                CRASH_CONCURRENCY,
                send,
                request_timeout=REQUEST_TIMEOUT,
                timeout=LOAD_TIMEOUT,
            )
        finally:
            finished.set()

    elapsed, _ = await asyncio.gather(load(), crash_and_restart())
    for crash in crashes:
        crash.first_created_at = min(
            (a.done_at for a in answers if a.status == 201 and a.done_at >= crash.accepted_at),
            default=float("nan"),
        )
    return answers, crashes, elapsed


@pytest.mark.slow
def test_acknowledged_writes_survive_crashes(
    project: Path, tmp_path: Path, record_property: Callable[[str, Any], None]
) -> None:
    run_id = uuid.uuid4().hex[:8]
    with throwaway_cluster(fsync=True) as cluster:
        create_database(cluster.url, "durability")
        database_url = with_database(cluster.url, "durability")
        migrate(project, database_url)
        service = Service(project, tmp_path / "uvicorn.log", DATABASE_URL=database_url)
        try:
            service.start()
            answers, crashes, elapsed = asyncio.run(
                post_under_crashes(service.base_url, cluster, run_id)
            )
        finally:
            service.stop()
        with psycopg.connect(database_url, connect_timeout=5) as conn:
            settings = dict(conn.execute("SELECT name, setting FROM pg_settings").fetchall())
            rows = conn.execute("SELECT id, name, description, price_cents FROM items").fetchall()
        server_log = (cluster.root / "server.log").read_text(errors="replace")
    log = service.log()

    sent = {body["name"]: body for body in map(partial(item_body, run_id), range(CRASH_REQUESTS))}
    stored = {
        name: (id_, {"name": name, "description": d, "price_cents": p}) for id_, name, d, p in rows
    }
    statuses = Counter("transport error" if a.status is None else a.status for a in answers)
    created = [a for a in answers if a.status == 201]
    unknown = [a for a in answers if a.status in {503, 504}]
    # Committed, but the answer said otherwise: the connection broke during COMMIT. Why, in
    # the service's own words (its warning line for the request).
    stored_after_error = Counter(
        next(
            (
                line.split("database unavailable: ", 1)[-1]
                for line in log.splitlines()
                if f"[{a.request_id}]" in line and "my_service.api.errors" in line
            ),
            "no log line",
        )
        for a in unknown
        if item_body(run_id, a.n)["name"] in stored
    )
    recoveries = ", ".join(f"{c.recovery:.3f}s" for c in crashes)
    figures = (
        f"{len(answers)} POST /items over {CRASH_CONCURRENCY} connections in {elapsed:.1f}s, "
        f"{len(crashes)} crashes; statuses {dict(sorted(statuses.items(), key=str))}; "
        f"{len(rows)} items stored, {len(created)} acknowledged and checked, "
        f"{sum(stored_after_error.values())} stored although answered 503/504 "
        f"{dict(stored_after_error)}; recovery {recoveries}"
    )
    report(record_property, "crash", figures)

    assert settings["fsync"] == "on", "the cluster must sync its writes for this test"
    assert len(answers) == CRASH_REQUESTS, figures
    assert len(crashes) == CRASHES, figures
    # Each start after a crash recovered from the write-ahead log.
    assert server_log.count("automatic recovery in progress") == CRASHES, server_log[-3000:]
    assert statuses[503] > 0, f"no request saw the database down: {figures}"
    traceback = log[log.find("Traceback") :][:3000] if "Traceback" in log else ""
    assert not traceback, f"a traceback in the service's log: {figures}\n{traceback}"
    failed = [a for a in answers if a.status not in EXPECTED_STATUSES]
    assert not failed, (
        f"answers other than {sorted(EXPECTED_STATUSES)}: {figures}\nfirst: {failed[0]}\n"
        f"{traceback}"
    )

    # Every acknowledged item is stored, with the id it was answered with and what was sent.
    for answer in created:
        expected = item_body(run_id, answer.n)
        assert answer.body == {
            **expected,
            "id": answer.body["id"],
            "created_at": answer.body["created_at"],
        }, answer
        assert expected["name"] in stored, f"acknowledged but lost: {answer}; {figures}"
        id_, values = stored[expected["name"]]
        assert values == expected, f"stored {values}, sent {expected}"
        assert id_ == answer.body["id"], f"stored as id {id_}, answered {answer.body['id']}"
    # Nothing is stored that was not sent, and nothing differs from what was sent.
    for name, (_, values) in stored.items():
        assert name in sent, f"an item no request sent: {values}"
        assert values == sent[name], f"stored {values}, sent {sent[name]}"

    for number, crash in enumerate(crashes, 1):
        assert crash.recovery <= RECOVERY_SECONDS, f"crash {number}: {figures}"


# -- 2. a killed worker leaves nothing half-written ------------------------------------


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
    project: Path, tmp_path: Path, record_property: Callable[[str, Any], None]
) -> None:
    (project / "src" / PACKAGE / f"{SCAFFOLD_MODULE}.py").write_text(SCAFFOLD)
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


# -- 3. secrets stay secret -------------------------------------------------------------

# Settings, reprs and errors of the service, in its own environment; every message printed.
PROBE = """\
import asyncio, json, os
from sqlalchemy import text
from my_service.config import SettingsError, load_settings
from my_service.db import Database

messages = []
settings = load_settings()
messages += [repr(settings), str(settings), str(settings.database_url)]
messages += [repr(settings.database_url), repr(settings.database_read_url)]
messages += [repr(getattr(settings, "database_migration_url", None))]
url = os.environ["DATABASE_URL"]
for variable in ("database_url", "database_read_url", "database_migration_url"):
    for bad in (url.replace("postgresql://", "mysql://", 1), url.replace("/secrets", ":x/y", 1)):
        try:
            load_settings(**{variable: bad})
        except SettingsError as exc:
            messages.append(str(exc))


async def read(database):
    async with database.read_session() as session:
        await session.execute(text("SELECT 1"))


async def main():
    async with Database(settings) as database:
        for attempt in (database.ping, lambda: read(database)):
            try:
                await attempt()
            except Exception as exc:
                messages.extend([str(exc), repr(exc), repr(exc.__cause__)])


asyncio.run(main())
print("MESSAGES", json.dumps(messages))
"""


@dataclass
class Secrets:
    """What must never show up, and what each check needs to know about it."""

    passwords: list[str]
    values: list[str]  # bound parameter values the test sent

    def forbidden(self) -> set[str]:
        words = set(self.passwords) | {quote(p, safe="") for p in self.passwords}
        return words | {p.split("-")[1] for p in self.passwords}  # the random part alone

    def leaks(self, text: str, *, values: bool = False, urls: bool = False) -> list[str]:
        """The passwords in `text`, and the values sent and URLs with a user if asked."""
        found = sorted(word for word in self.forbidden() if word in text)
        if values:
            found += [value for value in self.values if value in text]
        if urls:
            found += FULL_URL.findall(text)
        return found


def exchange(
    client: httpx.Client, seen: list[str], method: str, path: str, **kwargs: Any
) -> httpx.Response:
    """A request whose answer (status line, headers, body) is kept for the search."""
    response = client.request(method, path, **kwargs)
    headers = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
    seen.append(f"{method} {path} -> {response.status_code}\n{headers}\n{response.text}")
    return response


@pytest.mark.slow
def test_no_secret_in_output_answers_or_errors(
    project: Path, tmp_path: Path, record_property: Callable[[str, Any], None]
) -> None:
    token = uuid.uuid4().hex
    # Characters that a URL must escape, so that both spellings are searched for.
    password = f"Pw-{uuid.uuid4().hex[:12]}-@:/%"
    reader_password = f"Rd-{uuid.uuid4().hex[:12]}-#?&"
    owner_password = f"Ow-{uuid.uuid4().hex[:12]}-;' ="
    price = 7_318_093  # beyond any process id, port or line number
    secrets = Secrets(
        [password, reader_password, owner_password],
        [f"name-{token}", f"desc-{token}", str(price)],
    )
    responses: list[str] = []
    caught: list[str] = []
    outputs: dict[str, str] = {}
    statuses: Counter[int] = Counter()

    with throwaway_cluster(password=password) as cluster:
        host = f"127.0.0.1:{cluster.port}"
        # The password is really used: without it the server refuses the login.
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(f"postgresql://postgres@{host}/postgres", connect_timeout=5)
        caught.append(str(refused.value))
        assert "password authentication failed" in str(refused.value) or "no password" in str(
            refused.value
        ), refused.value
        # Three roles, a password each: the service (postgres), its reads (reader) and the
        # migrations, which own the schema (owner).
        with psycopg.connect(cluster.url, autocommit=True, connect_timeout=5) as conn:
            for role, secret in (("owner", owner_password), ("reader", reader_password)):
                query = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}")
                conn.execute(query.format(sql.Identifier(role), sql.Literal(secret)))
            conn.execute("CREATE DATABASE secrets OWNER owner")
        database_url = with_database(cluster.url, "secrets")
        read_url = f"postgresql://reader:{quote(reader_password, safe='')}@{host}/secrets"
        migration_url = f"postgresql://owner:{quote(owner_password, safe='')}@{host}/secrets"
        urls = {
            "DATABASE_URL": database_url,
            "DATABASE_READ_URL": read_url,
            "DATABASE_MIGRATION_URL": migration_url,
        }
        outputs["alembic upgrade head"] = migrate(project, database_url, **urls)
        with psycopg.connect(migration_url, autocommit=True, connect_timeout=5) as conn:
            owner = conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'items'")
            assert owner.fetchone() == ("owner",), "the migrations ran as another role"
            conn.execute("GRANT SELECT ON items TO reader")

        for log_format in ("text", "json"):
            service = Service(
                project,
                tmp_path / f"{log_format}.out",
                stderr_path=tmp_path / f"{log_format}.err",
                **urls,
                DB_ECHO="true",
                LOG_LEVEL="DEBUG",
                LOG_FORMAT=log_format,
                DB_SLOW_QUERY_MS="0.001",
            )
            try:
                service.start()
                with httpx.Client(base_url=service.base_url, timeout=10) as client:
                    body = {
                        "name": f"name-{token}-{log_format}",
                        "description": f"desc-{token}",
                        "price_cents": price,
                    }
                    created = exchange(client, responses, "POST", "/items", json=body)
                    assert created.status_code == 201, created.text
                    item = f"/items/{created.json()['id']}"
                    calls = [
                        ("GET", item, {}),
                        ("GET", "/items", {"params": {"limit": 5}}),
                        ("POST", "/items", {"json": body}),  # a duplicate: 409
                        ("GET", "/health/db", {}),
                        ("GET", "/metrics", {}),
                    ]
                    for method, path, kwargs in calls:
                        statuses[
                            exchange(client, responses, method, path, **kwargs).status_code
                        ] += 1

                    cluster.stop_server()
                    outage = {**body, "name": f"name-{token}-{log_format}-outage"}
                    for method, path, kwargs in [
                        ("POST", "/items", {"json": outage}),
                        ("GET", item, {}),
                        ("GET", "/items", {}),
                        ("GET", "/health/db", {}),
                    ]:
                        response = exchange(client, responses, method, path, **kwargs)
                        assert response.status_code == 503, (path, response.text)
                        statuses[503] += 1
                    exchange(client, responses, "GET", "/metrics")
                    if log_format == "text":
                        # The service's own errors while the database is down.
                        probe = run(
                            [*UV_RUN, "python", "-c", PROBE],
                            project,
                            clean_env(**urls),
                        )
                        logged, _, printed = probe.partition("MESSAGES ")
                        caught.extend(json.loads(printed.splitlines()[0]))
                        outputs["the probe's log"] = logged + printed.partition("\n")[2]
                        with pytest.raises(psycopg.OperationalError) as down:
                            psycopg.connect(database_url, connect_timeout=5)
                        caught.append(str(down.value))

                    cluster.start_server()
                    wait_accepting(cluster.url)
                    wait_until(
                        lambda item=item: (
                            exchange(client, responses, "GET", item).status_code == 200
                        ),
                        15,
                        "the service answers again",
                    )
                    again = {**body, "name": f"name-{token}-{log_format}-again"}
                    assert (
                        exchange(client, responses, "POST", "/items", json=again).status_code == 201
                    )
                    assert exchange(client, responses, "GET", "/health/db").status_code == 200
            finally:
                service.stop()
            outputs[f"stdout, LOG_FORMAT={log_format}"] = service.log()
            outputs[f"stderr, LOG_FORMAT={log_format}"] = service.stderr()

    # The checks could fail: the echo, the debug lines and the outage really happened.
    text_log = outputs["stdout, LOG_FORMAT=text"]
    json_log = outputs["stdout, LOG_FORMAT=json"]
    assert "Running upgrade" in outputs["alembic upgrade head"], outputs["alembic upgrade head"]
    for log in (text_log, json_log):
        assert "INSERT INTO items" in log, "no statement echoed (DB_ECHO)"
        assert "slow query" in log, "no slow-query line"
        assert "database unavailable" in log, "no outage line"
    assert statuses == {200: 8, 409: 2, 503: 8}, statuses

    # Output: no password, no URL with a user in it, no value a request sent.
    problems = [
        f"{where}: {leaks} in {line[:300]!r}"
        for where, output in outputs.items()
        for line in output.splitlines()
        if (leaks := secrets.leaks(line, values=True, urls=True))
    ]
    # Answers carry the values sent (the items), but neither passwords nor URLs.
    problems += [
        f"answer: {leaks} in {answer[:300]!r}"
        for answer in responses
        if (leaks := secrets.leaks(answer, urls=True))
    ]
    # Exception messages and reprs: no password (a URL with the password masked may appear).
    problems += [
        f"exception or repr: {leaks} in {message[:300]!r}"
        for message in caught
        if (leaks := secrets.leaks(message, values=True))
    ]
    lines = sum(len(output.splitlines()) for output in outputs.values())
    figures = (
        f"{lines} lines of output, {len(responses)} answers, {len(caught)} exception messages "
        f"searched; statuses {dict(statuses)}"
    )
    report(record_property, "secrets", figures)
    assert not problems, "\n".join(problems[:20])
