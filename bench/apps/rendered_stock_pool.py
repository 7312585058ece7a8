"""The rendered asyncpg service, unchanged except for its pool class: SQLAlchemy's stock
`AsyncAdaptedQueuePool` instead of the template's own hand-over pool (`HandOverQueuePool`).

The rendered code is not edited. `make_engine` reads its pool class from a module global when
it builds the engine (in the lifespan, after this module has run), so rebinding that name to the
stock class is enough. The name is looked up in `db/engine.py` and `db/pool.py` (where it has
lived), and rebound in each that has it; neither having it stops start-up. Other modules keep
the original class, so code that asks `isinstance(pool, HandOverQueuePool)` (pool figures for
/health/db) takes its path for other pools, as it would with a pool class the service does not
know. Once the lifespan has built the engine, every queue pool alive must be the stock one, or
start-up fails: the comparison would be void otherwise.
"""

from __future__ import annotations

import gc
import importlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from types import ModuleType
from typing import Any

from fastapi import FastAPI
from sqlalchemy.pool import AsyncAdaptedQueuePool, QueuePool

PACKAGE = "my_service"
POOL_CLASS = "HandOverQueuePool"
# Where the rendered service has kept (or keeps) its pool class.
POOL_MODULES = (f"{PACKAGE}.db.engine", f"{PACKAGE}.db.pool")


def optional_module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name != name:  # the module exists but something it imports does not
            raise
        return None


def use_stock_pool() -> list[str]:
    """Rebind the pool class name in each of POOL_MODULES that has it; the names rebound."""
    rebound = []
    for module in map(optional_module, POOL_MODULES):
        if module is not None and hasattr(module, POOL_CLASS):
            setattr(module, POOL_CLASS, AsyncAdaptedQueuePool)
            rebound.append(f"{module.__name__}.{POOL_CLASS}")
    if not rebound:
        raise SystemExit(
            f"stock-pool case: no {POOL_CLASS} in {' or '.join(POOL_MODULES)}; "
            "bench/apps/rendered_stock_pool.py must learn where the rendered pool class lives"
        )
    return rebound


rendered = importlib.import_module(f"{PACKAGE}.main")
REBOUND = use_stock_pool()
app: FastAPI = rendered.app
rendered_lifespan = app.router.lifespan_context


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[Any]:
    async with rendered_lifespan(app) as state:
        pools = [o for o in gc.get_objects() if isinstance(o, QueuePool)]
        wrong = [type(p).__name__ for p in pools if type(p) is not AsyncAdaptedQueuePool]
        if not pools or wrong:
            raise RuntimeError(
                f"stock-pool case: the service's queue pools are {wrong or 'missing'}, not "
                f"AsyncAdaptedQueuePool (rebound: {REBOUND})"
            )
        print(f"stock-pool case: AsyncAdaptedQueuePool via {', '.join(REBOUND)}", flush=True)
        yield state


app.router.lifespan_context = lifespan
