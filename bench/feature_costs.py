"""What each feature of the rendered service costs per request, measured in-process.

The rendered asyncpg service (default answers) runs inside one Python process, without uvicorn
or a network client: requests are ASGI calls of `GET /items/{id}` one after another, and the
CPU time of the process is divided by their number. One feature at a time is taken out of the
same application, so the difference to the full service is what that feature costs:

- the request id middleware (asgi-correlation-id: X-Request-ID and the id on log lines);
- the request metrics middleware (`GET /metrics`' request counts and durations);
- the body size limit (413 for bodies over 1 MiB);
- the engine listeners (failure counts, statement timing for the slow-query log and metrics);
- the checkout check of DB_POOL_PRE_PING;
- FastAPI's `yield` dependency that gives each request its session and commits it before the
  response (the same session opened in the handler instead);
- and, as the floor, the same query in a plain FastAPI handler on a plain session (what (c)
  of the HTTP load does), with none of the layer around it.

Cases run in interleaved rounds, and each figure is the median of the rounds.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path
from typing import Any

import psycopg

from harness.rendering import clean_env, render
from harness.services import create_database, drop_database, run, with_database

ROUNDS = 5
REQUESTS = 2000
SEED_ITEMS = 1000
# (name, what is changed): EXCLUDE names middleware classes taken out; NO_LISTENERS skips the
# Database's engine listeners; PLAIN serves the query from a plain handler instead.
CASES: tuple[tuple[str, dict[str, str]], ...] = (
    ("full service (defaults)", {}),
    ("without the request id middleware", {"EXCLUDE": "CorrelationIdMiddleware"}),
    ("without the request metrics middleware", {"EXCLUDE": "RequestMetrics"}),
    ("without the body size limit", {"EXCLUDE": "BodySizeLimit"}),
    ("without the engine listeners", {"NO_LISTENERS": "1"}),
    ("without the checkout check", {"DB_POOL_PRE_PING": "false"}),
    ("session opened in the handler, not the dependency", {"NO_DEPENDENCY": "1"}),
    (
        "without all of the above",
        {
            "EXCLUDE": "CorrelationIdMiddleware,RequestMetrics,BodySizeLimit",
            "NO_LISTENERS": "1",
            "DB_POOL_PRE_PING": "false",
        },
    ),
    ("floor: plain session in the handler", {"PLAIN": "1"}),
)

# Runs inside the rendered project's environment; prints the CPU microseconds per request.
DRIVER = """
import asyncio, os, random, time

from contextlib import asynccontextmanager

import PACKAGE.db.database as database_module
from PACKAGE.main import create_app


def plain_app():
    from fastapi import FastAPI, HTTPException
    from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine

    from PACKAGE.models.item import Item
    from PACKAGE.schemas import ItemRead

    makers = {}

    @asynccontextmanager
    async def lifespan(app):
        url = os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+asyncpg://", 1)
        engine = create_async_engine(url)
        makers["session"] = async_sessionmaker(engine, expire_on_commit=False)
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/items/{item_id}")
    async def get_item(item_id: int) -> ItemRead:
        async with makers["session"]() as session:
            item = await session.get(Item, item_id)
            if item is None:
                raise HTTPException(404)
            return ItemRead.model_validate(item)

    return app


def build():
    if os.environ.get("PLAIN"):
        return plain_app()
    if os.environ.get("NO_LISTENERS"):
        database_module.count_failures = lambda *args: None
        database_module.time_statements = lambda *args: None
    app = create_app()
    excluded = set(filter(None, os.environ.get("EXCLUDE", "").split(",")))
    app.user_middleware = [m for m in app.user_middleware if m.cls.__name__ not in excluded]
    if os.environ.get("NO_DEPENDENCY"):
        from fastapi import HTTPException, Request

        from PACKAGE.api.deps import database_of
        from PACKAGE.models.item import Item
        from PACKAGE.schemas import ItemRead

        @app.get("/items/{item_id}")
        async def get_item(item_id: int, request: Request) -> ItemRead:
            async with database_of(request).read_session() as session:
                item = await session.get(Item, item_id)
                if item is None:
                    raise HTTPException(404)
                return ItemRead.model_validate(item)

        # Matched before the example's own route.
        app.router.routes.insert(0, app.router.routes.pop())
    return app


async def measure(app, requests):
    state = {}
    events = asyncio.Queue()
    started = asyncio.Event()

    async def lifespan_send(message):
        if message["type"] == "lifespan.startup.complete":
            started.set()

    await events.put({"type": "lifespan.startup"})
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}
    lifespan = asyncio.create_task(app(scope, events.get, lifespan_send))
    await started.wait()

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise AssertionError(f"answered {message['status']}")

    def request(path):
        return {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "headers": [(b"host", b"bench")],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": dict(state),
        }

    paths = [f"/items/{random.randint(1, SEED)}" for _ in range(requests + 200)]
    for path in paths[:200]:  # warm-up: connections, caches
        await app(request(path), receive, send)
    cpu = time.process_time()
    for path in paths[200:]:
        await app(request(path), receive, send)
    cpu = time.process_time() - cpu
    await events.put({"type": "lifespan.shutdown"})
    await lifespan
    return cpu / requests * 1e6


print(round(asyncio.run(measure(build(), REQUESTS)), 1))
"""


def prepare(work: Path, admin_url: str) -> tuple[Path, str, str]:
    """Render the service, build its environment, and a seeded database: (project, script,
    database name)."""
    project = render(work / "svc", db_driver="asyncpg", with_example=True)
    run(["uv", "sync", "--quiet"], project, clean_env())
    name = f"bench_features_{project.stat().st_ino}"
    create_database(admin_url, name)
    url = with_database(admin_url, name)
    run(
        ["uv", "run", "--no-sync", "alembic", "upgrade", "head"],
        project,
        clean_env(DATABASE_URL=url),
    )
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO items (name, price_cents) "
            "SELECT 'seed-' || g, 100 FROM generate_series(1, %s) AS g",
            (SEED_ITEMS,),
        )
    script = work / "feature_costs_driver.py"
    source = DRIVER.replace("PACKAGE", "my_service")
    source = source.replace("SEED", str(SEED_ITEMS)).replace("REQUESTS)", f"{REQUESTS})")
    script.write_text(source)
    return project, str(script), name


def measure(project: Path, script: str, url: str, changes: dict[str, str]) -> float:
    env = clean_env(DATABASE_URL=url, LOG_LEVEL="WARNING", **changes)
    result = subprocess.run(
        ["uv", "run", "--no-sync", "python", script],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if result.returncode != 0:
        raise RuntimeError(f"feature cost run failed ({changes}):\n{result.stderr[-4000:]}")
    return float(result.stdout.strip().splitlines()[-1])


def run_all(work: Path, admin_url: str, rounds: int = ROUNDS) -> list[dict[str, Any]]:
    project, script, name = prepare(work, admin_url)
    url = with_database(admin_url, name)
    samples: dict[str, list[float]] = {case: [] for case, _ in CASES}
    try:
        for round_ in range(1, rounds + 1):
            for case, changes in CASES:
                cpu = measure(project, script, url, changes)
                samples[case].append(cpu)
                print(f"  [{round_}/{rounds}] {case:45s} {cpu:8.1f} us/req", flush=True)
    finally:
        drop_database(admin_url, name)
    full = statistics.median(samples[CASES[0][0]])
    return [
        {
            "case": case,
            "cpu_us": round(statistics.median(values), 1),
            "vs_full_service": round(statistics.median(values) / full, 3),
            "saved_us": round(full - statistics.median(values), 1),
            "rounds": json.dumps([round(v, 1) for v in values]),
        }
        for case, values in samples.items()
    ]
