"""The `checkout` layer of `layers.py` taken apart: what each piece of a read session costs
inside a running service (bench/README.md, "Where the checkout's time goes").

    PYTHONPATH=bench/apps uvicorn --factory checkout_parts:create_app

In the rendered service's stack, each route answers the same constant after one more piece:

- `/constant/{id}`: nothing;
- `/dependency/{id}`: an empty yield dependency (FastAPI's own cost of one);
- `/turns/{id}`: the Database's turns taken and given back, in a yield dependency;
- `/session/{id}` and `/session-closed/{id}`: an AsyncSession from the read sessionmaker in a
  yield dependency, without a connection; ended by `async with` (which SQLAlchemy closes in a
  task of its own, shielded from cancellation) or by `await session.close()`;
- `/session-connection/{id}`, `/session-closed-connection/{id}`: the same with a connection;
- `/engine-connection/{id}`: a connection from the engine in the handler, no session;
- `/read-session-in-handler/{id}`: `Database.read_session()` and a connection in the handler;
- `/read-session/{id}`: `ReadSessionDep` and a connection, as the `checkout` layer.

Drive each with wrk and read the service's CPU time from /proc/<pid>/stat before and after.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from my_service.api.deps import ReadSessionDep, get_database
from my_service.main import create_app as create_service
from sqlalchemy.ext.asyncio import AsyncSession

CONSTANT = {"id": 1, "name": "constant", "description": None, "price_cents": 1}


async def nothing() -> AsyncIterator[None]:
    yield None


async def turns(request: Request) -> AsyncIterator[None]:
    semaphore = (await get_database(request)).turns["primary"]
    await semaphore.acquire()
    try:
        yield None
    finally:
        semaphore.release()


async def session(request: Request) -> AsyncIterator[AsyncSession]:
    async with (await get_database(request)).read_sessionmaker() as opened:
        yield opened


async def session_closed(request: Request) -> AsyncIterator[AsyncSession]:
    opened = (await get_database(request)).read_sessionmaker()
    try:
        yield opened
    finally:
        await opened.close()


Nothing = Annotated[None, Depends(nothing, scope="function")]
Turns = Annotated[None, Depends(turns, scope="function")]
Session = Annotated[AsyncSession, Depends(session, scope="function")]
SessionClosed = Annotated[AsyncSession, Depends(session_closed, scope="function")]


async def constant(item_id: int) -> dict[str, Any]:
    return CONSTANT


async def dependency(item_id: int, _: Nothing) -> dict[str, Any]:
    return CONSTANT


async def taken_turns(item_id: int, _: Turns) -> dict[str, Any]:
    return CONSTANT


async def bare_session(item_id: int, _: Session) -> dict[str, Any]:
    return CONSTANT


async def bare_session_closed(item_id: int, _: SessionClosed) -> dict[str, Any]:
    return CONSTANT


async def session_connection(item_id: int, opened: Session) -> dict[str, Any]:
    await opened.connection()
    return CONSTANT


async def session_closed_connection(item_id: int, opened: SessionClosed) -> dict[str, Any]:
    await opened.connection()
    return CONSTANT


async def engine_connection(item_id: int, request: Request) -> dict[str, Any]:
    async with (await get_database(request)).engine.connect():
        return CONSTANT


async def read_session_in_handler(item_id: int, request: Request) -> dict[str, Any]:
    async with (await get_database(request)).read_session() as opened:
        await opened.connection()
    return CONSTANT


async def read_session(item_id: int, opened: ReadSessionDep) -> dict[str, Any]:
    await opened.connection()
    return CONSTANT


ROUTES: dict[str, Callable[..., Any]] = {
    "constant": constant,
    "dependency": dependency,
    "turns": taken_turns,
    "session": bare_session,
    "session-closed": bare_session_closed,
    "session-connection": session_connection,
    "session-closed-connection": session_closed_connection,
    "engine-connection": engine_connection,
    "read-session-in-handler": read_session_in_handler,
    "read-session": read_session,
}


def create_app() -> FastAPI:
    app: FastAPI = create_service()
    for name, route in ROUTES.items():
        app.add_api_route(f"/{name}/{{item_id}}", route, methods=["GET"])
    return app
