"""The rendered asyncpg service, unchanged except for its pool class: SQLAlchemy's stock
`AsyncAdaptedQueuePool` instead of the template's own hand-over pool (`HandOverQueuePool`).

The rendered code is not edited. `make_engine` reads its pool class from a module global when
it builds the engine (in the lifespan, after this module has run), so rebinding that name to the
stock class is enough. The class is looked up in `db/engine.py` and `db/pool.py` (where it may
live), and every module of the package that holds it gets the stock class instead; neither
module having it stops start-up. Once the lifespan has built the engine, every queue pool alive
must be the stock one, or start-up fails: the comparison would be void otherwise.
"""

from __future__ import annotations

import gc
import importlib
import sys
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


def hand_over_pool_class() -> type[Any]:
    found = [
        getattr(module, POOL_CLASS)
        for module in map(optional_module, POOL_MODULES)
        if module is not None and hasattr(module, POOL_CLASS)
    ]
    if not found:
        raise SystemExit(
            f"stock-pool case: no {POOL_CLASS} in {' or '.join(POOL_MODULES)}; "
            "bench/apps/rendered_stock_pool.py must learn where the rendered pool class lives"
        )
    return found[0]


def use_stock_pool(hand_over: type[Any]) -> list[str]:
    """Rebind every module-level reference to `hand_over` in the package; their names."""
    rebound = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == PACKAGE or name.startswith(PACKAGE + ".")):
            continue
        for attribute, value in list(vars(module).items()):
            if value is hand_over:
                setattr(module, attribute, AsyncAdaptedQueuePool)
                rebound.append(f"{name}.{attribute}")
    return rebound


HAND_OVER = hand_over_pool_class()
rendered = importlib.import_module(f"{PACKAGE}.main")
REBOUND = use_stock_pool(HAND_OVER)
if not any(name.rsplit(".", 1)[0] in POOL_MODULES for name in REBOUND):
    raise SystemExit(f"stock-pool case: nothing rebound in {POOL_MODULES} ({REBOUND})")

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
