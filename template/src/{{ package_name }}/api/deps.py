"""FastAPI dependencies: the Database the lifespan opened, and one session per request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from ..db import Database
from ..db.session import WRITES, Writes


def database_of(request: Request) -> Database:
    """The Database that the application's lifespan opened (its state; see main.py)."""
    database: Database = request.state.database
    return database


# The dependencies are `async def` although some never await: FastAPI runs a plain `def`
# dependency in its thread pool, a thread hop on every request.
async def get_database(request: Request) -> Database:
    """The Database, for handlers and probes that need more than a session."""
    return database_of(request)


DatabaseDep = Annotated[Database, Depends(get_database)]


def request_writes(request: Request) -> Writes:
    """The request's record of whether it wrote: its read sessions turn to the primary then."""
    writes: Writes | None = request.scope.get(WRITES)
    if writes is None:
        writes = request.scope[WRITES] = Writes()
    return writes


# The session dependencies read the Database themselves rather than through DatabaseDep:
# one dependency less to resolve on every request.
async def get_db(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request: committed if the handler returns, rolled back if it raises."""
    async with database_of(request).session() as session:
        session.info[WRITES] = request_writes(request)
        yield session


async def get_read_db(request: Request) -> AsyncIterator[AsyncSession]:
    """One read-only session per request: the database refuses writes through it. After the
    request wrote, it reads from the primary (never from a replica that may lag)."""
    async with database_of(request).read_session() as session:
        session.info[WRITES] = request_writes(request)
        yield session


# scope="function" commits before the response is sent, so a failed commit turns into an
# error response instead of following a success the client already received.
SessionDep = Annotated[AsyncSession, Depends(get_db, scope="function")]
ReadSessionDep = Annotated[AsyncSession, Depends(get_read_db, scope="function")]
