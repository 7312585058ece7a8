"""Forms of the example's reads and writes, in the rendered service's stack: what each costs
(bench/README.md, "Which form for a statement"). Driven by `bench/route_costs.py`.

GET routes read item `{item_id}` and answer it as `GET /items/{item_id}` does (ItemRead, ETag):

- `session-get`: `session.get(Item, id)` through `ReadSessionDep` (the example up to 0.4.0);
- `built-select`: a `select()` of the columns, built in the handler, through `ReadSessionDep`;
- `built-once`: the same statement built once at import, the id bound per request;
- `built-once-table`: `built-once` on the model's Table (`Item.__table__`), not on the class:
  a Core statement, no ORM plugin in the session's execute (the example);
- `built-once-entity`: `select(Item)` built once: ORM objects, the statement not rebuilt;
- `connection-dependency`: `built-once` on an `AsyncConnection` from a yield dependency taking
  the service's turns (no session);
- `connection-in-handler`: the same with the connection opened in the handler.

POST routes create an item through `SessionDep`: `post-orm` with `session.add` and a flush
(the example up to 0.4.0), `post-core` with an INSERT ... RETURNING built once, run by the
session (the ORM's bulk-insert path), `post-raw` the same with `dml_strategy="raw"`,
`post-table` the INSERT on the model's Table, run by the session (the
example), `post-connection` the class's INSERT on the session's connection (Core alone).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from my_service.api.deps import ReadSessionDep, SessionDep, get_database
from my_service.api.items import etag
from my_service.db import Database
from my_service.db.driver import for_reading
from my_service.main import create_app as create_service
from my_service.models import Item
from my_service.schemas.item import ItemCreate, ItemRead
from sqlalchemy import Row, bindparam, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

COLUMNS = (Item.id, Item.name, Item.description, Item.price_cents, Item.created_at, Item.version)
ONE = select(*COLUMNS).where(Item.id == bindparam("id"))
ONE_ENTITY = select(Item).where(Item.id == bindparam("id"))
INSERT = insert(Item).returning(*COLUMNS)
INSERT_RAW = INSERT.execution_options(dml_strategy="raw")
# The same on the Table: Core statements, no ORM plugin in the session's execute.
ITEMS = Item.__table__
ONE_TABLE = select(*ITEMS.c).where(ITEMS.c.id == bindparam("id"))
INSERT_TABLE = insert(ITEMS).returning(*ITEMS.c)


def answer(found: Item | Row[Any] | None, response: Response) -> ItemRead:
    if found is None:
        raise HTTPException(404, detail="item not found")
    response.headers["ETag"] = etag(found.version)
    return ItemRead.model_validate(found)


async def session_get(item_id: int, session: ReadSessionDep, response: Response) -> ItemRead:
    return answer(await session.get(Item, item_id), response)


async def built_select(item_id: int, session: ReadSessionDep, response: Response) -> ItemRead:
    row = (await session.execute(select(*COLUMNS).where(Item.id == item_id))).first()
    return answer(row, response)


async def built_once(item_id: int, session: ReadSessionDep, response: Response) -> ItemRead:
    return answer((await session.execute(ONE, {"id": item_id})).first(), response)


async def built_once_table(item_id: int, session: ReadSessionDep, response: Response) -> ItemRead:
    return answer((await session.execute(ONE_TABLE, {"id": item_id})).first(), response)


async def built_once_entity(item_id: int, session: ReadSessionDep, response: Response) -> ItemRead:
    return answer(await session.scalar(ONE_ENTITY, {"id": item_id}), response)


async def read_connection(database: Database) -> AsyncIterator[AsyncConnection]:
    """A connection on the read engine, in the service's turns (as Database.read_session())."""
    turns = database.turns["primary"]
    await turns.acquire()
    try:
        async with for_reading(database.engine).connect() as connection:
            yield connection
    finally:
        turns.release()


async def connection_dependency(request: Request) -> AsyncIterator[AsyncConnection]:
    async for connection in read_connection(await get_database(request)):
        yield connection


Connection = Annotated[AsyncConnection, Depends(connection_dependency, scope="function")]


async def on_connection(item_id: int, connection: Connection, response: Response) -> ItemRead:
    return answer((await connection.execute(ONE, {"id": item_id})).first(), response)


async def in_handler(item_id: int, request: Request, response: Response) -> ItemRead:
    async for connection in read_connection(await get_database(request)):
        row = (await connection.execute(ONE, {"id": item_id})).first()
    return answer(row, response)


async def post_orm(body: ItemCreate, session: SessionDep, response: Response) -> ItemRead:
    item = Item(**body.model_dump())
    session.add(item)
    await session.flush()
    return answer(item, response)


async def post_core(body: ItemCreate, session: SessionDep, response: Response) -> ItemRead:
    return answer((await session.execute(INSERT, body.model_dump())).one(), response)


async def post_raw(body: ItemCreate, session: SessionDep, response: Response) -> ItemRead:
    return answer((await session.execute(INSERT_RAW, body.model_dump())).one(), response)


async def post_table(body: ItemCreate, session: SessionDep, response: Response) -> ItemRead:
    return answer((await session.execute(INSERT_TABLE, body.model_dump())).one(), response)


async def post_connection(body: ItemCreate, session: SessionDep, response: Response) -> ItemRead:
    connection = await session.connection()
    return answer((await connection.execute(INSERT, body.model_dump())).one(), response)


ROUTES: dict[str, Callable[..., Any]] = {
    "session-get": session_get,
    "built-select": built_select,
    "built-once": built_once,
    "built-once-table": built_once_table,
    "built-once-entity": built_once_entity,
    "connection-dependency": on_connection,
    "connection-in-handler": in_handler,
}


def create_app() -> FastAPI:
    app: FastAPI = create_service()
    for name, route in ROUTES.items():
        app.add_api_route(f"/{name}/{{item_id}}", route, methods=["GET"])
    app.add_api_route("/post-orm", post_orm, methods=["POST"], status_code=201)
    app.add_api_route("/post-core", post_core, methods=["POST"], status_code=201)
    app.add_api_route("/post-raw", post_raw, methods=["POST"], status_code=201)
    app.add_api_route("/post-table", post_table, methods=["POST"], status_code=201)
    app.add_api_route("/post-connection", post_connection, methods=["POST"], status_code=201)
    return app
