"""The rendered service one layer at a time: the per-layer cost table of the HTTP load
(`bench/service_load.py`, group `layers`).

    BENCH_LAYER=<layer> PYTHONPATH=bench/apps uvicorn --factory layers:create_app

Each layer answers the example's two endpoints (GET /items/{item_id}, POST /items) doing what
the layer before it did and one thing more, so that the CPU time per request of one minus the
one before is what that thing costs:

- `framework`: a bare FastAPI app that validates the path or the body with the rendered
  schemas and answers a constant;
- `middlewares`: the same constant routes in front of the rendered app's own stack
  (`create_app()`: request id, HEAD, metrics, body limit, error answers), ahead of its routes;
- `checkout`: the rendered session dependency (ReadSessionDep for GET, SessionDep for POST:
  turns, pool checkout and its check, commit) and a connection from it; still a constant;
- `statement`: one Core statement on the table through that session, the example's columns,
  no ORM object (for POST an INSERT ... RETURNING, committed by the dependency), built once
  at import with its values bound per request, as the example's;
- `orm`: the ORM instead (`session.get`; `session.add` and a flush), the row as a plain dict;
- `service`: the rendered routes themselves (serialization into ItemRead, the ETag).

The rendered code is not edited; the layers only call its public names (create_app, the
dependencies of api/deps.py, the Item model, the schemas).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, status
from fastapi.routing import APIRoute
from my_service.api.deps import ReadSessionDep, SessionDep
from my_service.main import create_app as create_service
from my_service.models import Item
from my_service.schemas.item import ItemCreate
from sqlalchemy import bindparam, insert, select

LAYERS = ("framework", "middlewares", "checkout", "statement", "orm", "service")
CONSTANT = {"id": 1, "name": "constant", "description": None, "price_cents": 1}
COLUMNS = (Item.id, Item.name, Item.description, Item.price_cents, Item.created_at)


async def health() -> dict[str, str]:
    return {"status": "ok"}


async def constant_get(item_id: int) -> dict[str, Any]:
    return CONSTANT


async def constant_post(body: ItemCreate) -> dict[str, Any]:
    return CONSTANT


async def checkout_get(item_id: int, session: ReadSessionDep) -> dict[str, Any]:
    await session.connection()
    return CONSTANT


async def checkout_post(body: ItemCreate, session: SessionDep) -> dict[str, Any]:
    await session.connection()
    return CONSTANT


# Built once on the table, as the example's statements (api/items.py): a statement built in
# the handler costs its construction and its cache key in every request, and one naming the
# model class takes the session's ORM path.
ITEMS = Item.__table__
ONE = select(*(ITEMS.c[column.key] for column in COLUMNS)).where(ITEMS.c.id == bindparam("id"))
INSERT = insert(ITEMS).returning(*(ITEMS.c[column.key] for column in COLUMNS))


async def statement_get(item_id: int, session: ReadSessionDep) -> dict[str, Any]:
    row = (await session.execute(ONE, {"id": item_id})).one()
    return dict(row._mapping)


async def statement_post(body: ItemCreate, session: SessionDep) -> dict[str, Any]:
    return dict((await session.execute(INSERT, body.model_dump())).one()._mapping)


def plain(item: Item) -> dict[str, Any]:
    return {column.key: getattr(item, column.key) for column in COLUMNS}


async def orm_get(item_id: int, session: ReadSessionDep) -> dict[str, Any]:
    item = await session.get(Item, item_id)
    assert item is not None
    return plain(item)


async def orm_post(body: ItemCreate, session: SessionDep) -> dict[str, Any]:
    item = Item(**body.model_dump())
    session.add(item)
    await session.flush()
    return plain(item)


# Each layer's GET and POST handlers (the service layer has its own).
ROUTES: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "framework": (constant_get, constant_post),
    "middlewares": (constant_get, constant_post),
    "checkout": (checkout_get, checkout_post),
    "statement": (statement_get, statement_post),
    "orm": (orm_get, orm_post),
}


def create_app() -> FastAPI:
    layer = os.environ.get("BENCH_LAYER", "")
    if layer not in LAYERS:
        raise SystemExit(f"BENCH_LAYER must be one of {', '.join(LAYERS)} (got {layer!r})")
    if layer == "framework":
        app = FastAPI()
        app.add_api_route("/health", health, methods=["GET"])
    else:
        app = create_service()
    if layer == "service":
        return app
    get, post = ROUTES[layer]
    app.add_api_route("/items/{item_id}", get, methods=["GET"])
    app.add_api_route("/items", post, methods=["POST"], status_code=status.HTTP_201_CREATED)
    # Ahead of the service's own routes at the same paths, which would answer first.
    added = app.router.routes[-2:]
    assert all(isinstance(route, APIRoute) for route in added)
    del app.router.routes[-2:]
    app.router.routes[:0] = added
    return app
