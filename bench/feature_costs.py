"""What each feature of the rendered service costs per request, measured in-process.

The rendered asyncpg service (default answers) runs inside one Python process, without uvicorn
or a network client: requests are ASGI calls of `GET /items/{id}`, 64 at a time (CONCURRENCY,
as wrk's connections), so pool waits and hand-overs count as they do under load; the CPU time
of the process is divided by their number. Each case is its own application in that process,
with one feature of the full service taken out, so the difference to the full service is what
that feature costs:

- the request id middleware (asgi-correlation-id: X-Request-ID and the id on log lines);
- the request metrics middleware (`GET /metrics`' request counts and durations);
- the body size limit (413 for bodies over 1 MiB);
- the engine listeners (failure counts, statement timing for the slow-query log and metrics);
- the checkout check of DB_POOL_PRE_PING;
- read-only transactions: read sessions on the primary engine as it is, without BEGIN READ
  ONLY (the database would then accept writes through them);
- FastAPI's `yield` dependency that gives each request its session and commits it before the
  response (the same session opened in the handler instead);
- as the floor, the same query in a plain FastAPI handler on a plain session (what (c) of the
  HTTP load does), with none of the layer around it;
- and reference (d) of the HTTP load, the peer template's session dependency.

A shared machine's speed drifts by a third over minutes, so the cases are not run one after
another: every round runs a batch of each, in shuffled order. A case's CPU time is the median
of its batches, and its ratio to the full service the median of the ratios within each round.
"""

from __future__ import annotations

import json
import statistics
import subprocess
from pathlib import Path
from typing import Any

import psycopg

from harness.rendering import clean_env, render
from harness.services import migrate, run, scratch_database, with_database

ROUNDS = 15
BATCH = 1500  # requests per case and round
CONCURRENCY = 64
SEED_ITEMS = 1000
FIRST_FIVE = ["CorrelationIdMiddleware", "RequestMetrics", "BodySizeLimit"]
# (name, what is changed): "exclude" names middleware classes taken out; "no_listeners" skips
# the Database's engine listeners; "pre_ping_off" sets DB_POOL_PRE_PING=false;
# "not_read_only" gives read sessions the primary engine as it is; "no_dependency" opens the
# session in the handler; "plain" and "peer" are other applications.
CASES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("full service (defaults)", {}),
    ("without the request id middleware", {"exclude": ["CorrelationIdMiddleware"]}),
    ("without the request metrics middleware", {"exclude": ["RequestMetrics"]}),
    ("without the body size limit", {"exclude": ["BodySizeLimit"]}),
    ("without the engine listeners", {"no_listeners": True}),
    ("without the checkout check", {"pre_ping_off": True}),
    (
        "without all five of the above",
        {"exclude": FIRST_FIVE, "no_listeners": True, "pre_ping_off": True},
    ),
    ("reads without BEGIN READ ONLY", {"not_read_only": True}),
    ("session opened in the handler, not the dependency", {"no_dependency": True}),
    ("floor: plain session in the handler", {"plain": True}),
    ("(d) peer template session", {"peer": True}),
)

# Runs inside the rendered project's environment; prints {case: [CPU us per request, ...]}.
DRIVER = """
import asyncio, json, os, random, time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

import PACKAGE.db.database as database_module
import PACKAGE.db.driver as driver_module
from PACKAGE.api.deps import database_of
from PACKAGE.config import load_settings
from PACKAGE.main import create_app
from PACKAGE.models.item import Item
from PACKAGE.schemas import ItemRead

ROUNDS, BATCH, CONCURRENCY, SEED = ROUNDS_, BATCH_, CONCURRENCY_, SEED_
ASYNCPG_URL = os.environ["DATABASE_URL"].replace("postgresql://", "postgresql+asyncpg://", 1)


def plain_app(**engine_options):
    # A session opened in the handler; with a yield dependency instead for (d).
    makers = {}

    @asynccontextmanager
    async def lifespan(app):
        engine = create_async_engine(ASYNCPG_URL, **engine_options)
        makers["session"] = async_sessionmaker(engine, expire_on_commit=False)
        yield
        await engine.dispose()

    return FastAPI(lifespan=lifespan), makers


def build_plain():
    app, makers = plain_app()

    @app.get("/items/{item_id}")
    async def get_item(item_id: int) -> ItemRead:
        async with makers["session"]() as session:
            item = await session.get(Item, item_id)
            if item is None:
                raise HTTPException(404)
            return ItemRead.model_validate(item)

    return app


def build_peer():
    # bench/apps/peer_template.py: stock pool 5 + 10 with pre-ping, a yield dependency.
    app, makers = plain_app(pool_size=5, max_overflow=10, pool_pre_ping=True)

    async def get_session():
        async with makers["session"]() as session:
            yield session

    @app.get("/items/{item_id}")
    async def get_item(
        item_id: int, session: Annotated[AsyncSession, Depends(get_session)]
    ) -> ItemRead:
        item = await session.get(Item, item_id)
        if item is None:
            raise HTTPException(404)
        return ItemRead.model_validate(item)

    return app


def build_rendered(changes):
    settings = load_settings()
    if changes.get("pre_ping_off"):
        settings = settings.model_copy(update={"db_pool_pre_ping": False})
    app = create_app(settings)
    excluded = set(changes.get("exclude", []))
    app.user_middleware = [m for m in app.user_middleware if m.cls.__name__ not in excluded]
    if changes.get("no_dependency"):

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


def build(changes):
    if changes.get("plain"):
        return build_plain()
    if changes.get("peer"):
        return build_peer()
    return build_rendered(changes)


# What a case changes in the Database its lifespan opens: module globals, set while it opens.
def same(engine):
    return engine


def nothing(*args):
    return None


PATCHES = {
    "no_listeners": [
        (database_module, "count_failures", nothing),
        (database_module, "time_statements", nothing),
    ],
    "not_read_only": [
        (driver_module, "read_only_transactions", same),
        (database_module, "read_only_transactions", same),
    ],
}


async def start(app, changes):
    saved = []
    for key, patches in PATCHES.items():
        for module, name, value in patches if changes.get(key) else ():
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, value)
    state, events, started = {}, asyncio.Queue(), asyncio.Event()

    async def lifespan_send(message):
        if message["type"] == "lifespan.startup.complete":
            started.set()

    await events.put({"type": "lifespan.startup"})
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}
    lifespan = asyncio.create_task(app(scope, events.get, lifespan_send))
    try:
        await started.wait()
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)

    async def stop():
        await events.put({"type": "lifespan.shutdown"})
        await lifespan

    return state, stop


async def receive():
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message):
    if message["type"] == "http.response.start" and message["status"] != 200:
        raise AssertionError(f"answered {message['status']}")


async def load(app, state, count):
    paths = iter([f"/items/{random.randint(1, SEED)}" for _ in range(count)])

    def request(path):
        return {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "headers": [(b"host", b"bench")],
            "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": dict(state),
        }

    async def client():
        for path in paths:
            await app(request(path), receive, send)

    await asyncio.gather(*(client() for _ in range(CONCURRENCY)))


async def main():
    cases = json.loads(os.environ["CASES"])
    apps = {}
    for name, changes in cases:
        app = build(changes)
        apps[name] = (app, *await start(app, changes))
    for app, state, _ in apps.values():
        await load(app, state, 500)  # warm-up: connections, caches
    samples = {name: [] for name in apps}
    order = list(apps)
    for _ in range(ROUNDS):
        random.shuffle(order)
        for name in order:
            app, state, _ = apps[name]
            cpu = time.process_time()
            await load(app, state, BATCH)
            samples[name].append((time.process_time() - cpu) / BATCH * 1e6)
    for _, _, stop in apps.values():
        await stop()
    print(json.dumps(samples))


asyncio.run(main())
"""


def prepare(work: Path, url: str) -> tuple[Path, Path]:
    """Render the service, build its environment, migrate and seed the empty database at
    `url`: (project, script)."""
    project = render(work / "svc", db_driver="asyncpg", with_example=True)
    run(["uv", "sync", "--quiet"], project, clean_env())
    migrate(project, url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO items (name, price_cents) "
            "SELECT 'seed-' || g, 100 FROM generate_series(1, %s) AS g",
            (SEED_ITEMS,),
        )
    script = work / "feature_costs_driver.py"
    source = DRIVER.replace("PACKAGE", "my_service")
    for constant, value in (
        ("ROUNDS_", ROUNDS),
        ("BATCH_", BATCH),
        ("CONCURRENCY_", CONCURRENCY),
        ("SEED_", SEED_ITEMS),
    ):
        source = source.replace(constant, str(value))
    script.write_text(source)
    return project, script


def run_all(work: Path, admin_url: str) -> list[dict[str, Any]]:
    with scratch_database(admin_url, "bench_features") as name:
        url = with_database(admin_url, name)
        project, script = prepare(work, url)
        result = subprocess.run(
            ["uv", "run", "--no-sync", "python", str(script)],
            cwd=project,
            env=clean_env(DATABASE_URL=url, LOG_LEVEL="WARNING", CASES=json.dumps(CASES)),
            capture_output=True,
            text=True,
            timeout=1800,
        )
    if result.returncode != 0:
        raise RuntimeError(f"feature cost run failed:\n{result.stderr[-4000:]}")
    samples: dict[str, list[float]] = json.loads(result.stdout.strip().splitlines()[-1])
    full = samples[CASES[0][0]]
    return [
        {
            "case": case,
            "cpu_us": round(statistics.median(values), 1),
            "vs_full_service": round(
                statistics.median(value / base for value, base in zip(values, full, strict=True)),
                3,
            ),
            "saved_us": round(statistics.median(full) - statistics.median(values), 1),
            "rounds": json.dumps([round(v, 1) for v in values]),
        }
        for case, values in samples.items()
    ]
