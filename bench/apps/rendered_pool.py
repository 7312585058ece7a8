"""The rendered service, built by its own factory, with other pool options: the pool cases and
the pre-ping case of the HTTP load (`bench/service_load.py`).

    BENCH_POOL_CASE=<case> PYTHONPATH=bench/apps uvicorn --factory rendered_pool:create_app

The rendered code is not edited and none of its private names is rebound. One name is replaced:
`create_async_engine` in the rendered `<package>.db.engine` module, which that module looks up
when it builds an engine (in the application's lifespan). The replacement sets the case's pool
options in the keyword arguments and calls SQLAlchemy's `create_async_engine`; every other
option (pool_timeout, pool_recycle, connect_args, ...) stays as the service sets it. Engines
built without a pool to size (NullPool, StaticPool) are built as asked.

Cases (BENCH_POOL_CASE):

- `stock-15-0`: SQLAlchemy's `AsyncAdaptedQueuePool`, 15 connections and no overflow, so none
  is ever closed for being beyond the pool's size;
- `stock-5-10`: the same pool with SQLAlchemy-style sizes, 5 + 10;
- `handover-5-10`: the template's hand-over pool, from the bench's own copy
  (`handover_pool.py`), 5 + 10;
- `sqlalchemy-pre-ping`: the service's own pool and sizes with SQLAlchemy's `pool_pre_ping`
  (a round trip on every checkout) in place of the service's checkout check, which
  DB_POOL_PRE_PING=false turns off (the case refuses to start without it).

All but the last set `pool_pre_ping=False`, as the service does. Rather than measure the wrong
thing, the app fails loudly: at start when the case is unknown, its settings are missing, or
the module or the name is not there (or the name is not SQLAlchemy's function); once the
lifespan has started, when no pooled engine was built through the replacement or an engine's
pool is not the case's (or, for the pre-ping case, still has a checkout listener).
"""

from __future__ import annotations

import importlib
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from fastapi import FastAPI
from handover_pool import HandOverQueuePool
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.ext.asyncio import create_async_engine as sqlalchemy_create_async_engine
from sqlalchemy.pool import AsyncAdaptedQueuePool, NullPool, QueuePool, StaticPool

PACKAGE = "my_service"
ENGINE_MODULE = f"{PACKAGE}.db.engine"
ENGINE_FUNCTION = "create_async_engine"
FACTORY_MODULE = f"{PACKAGE}.main"
FACTORY = "create_app"
CASE_VARIABLE = "BENCH_POOL_CASE"
# Pool classes that take no pool size: engines built on them are left alone.
UNSIZED_POOLS = (NullPool, StaticPool)


@dataclass(frozen=True)
class PoolCase:
    # Set in the keyword arguments of every pooled create_async_engine call.
    options: dict[str, Any]
    # Settings the case needs in the service's environment.
    environment: dict[str, str] = field(default_factory=dict)
    # The pool must have no checkout listener: the service's own check is off.
    no_checkout_check: bool = False

    def describe(self) -> str:
        return ", ".join(
            f"{key}={getattr(value, '__name__', value)}" for key, value in self.options.items()
        )


CASES = {
    "stock-15-0": PoolCase(
        {
            "poolclass": AsyncAdaptedQueuePool,
            "pool_size": 15,
            "max_overflow": 0,
            "pool_pre_ping": False,
        }
    ),
    "stock-5-10": PoolCase(
        {
            "poolclass": AsyncAdaptedQueuePool,
            "pool_size": 5,
            "max_overflow": 10,
            "pool_pre_ping": False,
        }
    ),
    "handover-5-10": PoolCase(
        {
            "poolclass": HandOverQueuePool,
            "pool_size": 5,
            "max_overflow": 10,
            "pool_pre_ping": False,
        }
    ),
    "sqlalchemy-pre-ping": PoolCase(
        {"pool_pre_ping": True}, {"DB_POOL_PRE_PING": "false"}, no_checkout_check=True
    ),
}


def fail(message: str) -> SystemExit:
    return SystemExit(f"rendered_pool ({CASE_VARIABLE}={os.environ.get(CASE_VARIABLE)}): {message}")


def selected_case() -> PoolCase:
    name = os.environ.get(CASE_VARIABLE, "")
    case = CASES.get(name)
    if case is None:
        raise fail(f"set {CASE_VARIABLE} to one of {', '.join(CASES)}")
    wrong = {k: v for k, v in case.environment.items() if os.environ.get(k, "").lower() != v}
    if wrong:
        raise fail(f"the case needs {wrong} in the environment")
    return case


def rendered_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (name == exc.name or name.startswith(f"{exc.name}.")):
            raise  # the module is there, something it imports is not
        raise fail(
            f"the rendered service has no module {name}: bench/apps/rendered_pool.py must learn "
            "where the rendered service builds its engines"
        ) from exc


def replace_engine_function(case: PoolCase) -> list[AsyncEngine]:
    """Replace `create_async_engine` in the rendered engine module; the list it returns fills
    with the pooled engines built through the replacement."""
    module = rendered_module(ENGINE_MODULE)
    found = getattr(module, ENGINE_FUNCTION, None)
    if found is None:
        raise fail(
            f"{ENGINE_MODULE} has no {ENGINE_FUNCTION}: bench/apps/rendered_pool.py must learn "
            "where the rendered service builds its engines"
        )
    if found is not sqlalchemy_create_async_engine:
        raise fail(
            f"{ENGINE_MODULE}.{ENGINE_FUNCTION} is {found!r}, not SQLAlchemy's: replacing it "
            "would skip what it adds"
        )
    built: list[AsyncEngine] = []

    def create_async_engine(url: str | URL, **kwargs: Any) -> AsyncEngine:
        poolclass = kwargs.get("poolclass")
        if isinstance(poolclass, type) and issubclass(poolclass, UNSIZED_POOLS):
            return sqlalchemy_create_async_engine(url, **kwargs)
        engine = sqlalchemy_create_async_engine(url, **{**kwargs, **case.options})
        built.append(engine)
        return engine

    setattr(module, ENGINE_FUNCTION, create_async_engine)
    return built


def check_pools(case: PoolCase, built: list[AsyncEngine]) -> str:
    """What the service's pooled engines are; fails unless they are the case's."""
    if not built:
        raise fail(
            f"the service started without building a pooled engine through "
            f"{ENGINE_MODULE}.{ENGINE_FUNCTION}: bench/apps/rendered_pool.py must learn where "
            "the rendered service builds its engines"
        )
    found = []
    for engine in built:
        pool = engine.pool
        expected = case.options.get("poolclass")
        if expected is not None and type(pool) is not expected:
            raise fail(f"an engine's pool is {type(pool).__name__}, not {expected.__name__}")
        size = case.options.get("pool_size")
        if size is not None and (not isinstance(pool, QueuePool) or pool.size() != size):
            raise fail(f"an engine's pool is {pool.status()}, not of size {size}")
        if case.no_checkout_check and len(pool.dispatch.checkout) > 0:
            raise fail(
                "the pool has checkout listeners: the service's own checkout check is still on "
                "(DB_POOL_PRE_PING=false no longer turns it off?)"
            )
        if isinstance(pool, HandOverQueuePool):
            pool.waiting()  # asserts that its connections are kept in a HandOverQueue
        found.append(f"{type(pool).__name__} ({pool.status()})")
    return "; ".join(found)


def create_app() -> FastAPI:
    """The rendered service's own `create_app()`, on the pool of BENCH_POOL_CASE."""
    case = selected_case()
    built = replace_engine_function(case)
    factory: Callable[[], object] | None = getattr(rendered_module(FACTORY_MODULE), FACTORY, None)
    if factory is None:
        raise fail(f"{FACTORY_MODULE} has no {FACTORY}")
    app = factory()
    if not isinstance(app, FastAPI):
        raise fail(f"{FACTORY_MODULE}.{FACTORY}() returned {type(app).__name__}, not FastAPI")
    rendered_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
        async with rendered_lifespan(app) as state:
            pools = check_pools(case, built)
            print(
                f"rendered_pool: {os.environ[CASE_VARIABLE]}: {case.describe()}: {pools}",
                flush=True,
            )
            yield state

    app.router.lifespan_context = lifespan
    return app
