"""FastAPI dependencies: the Database the lifespan opened, and one session per request."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from ..db import Database


# The dependencies are `async def` although some never await: FastAPI runs a plain `def`
# dependency in its thread pool, a thread hop on every request.
async def get_database(request: Request) -> Database:
    """The Database that the application's lifespan opened (its state; see main.py)."""
    database: Database = request.state.database
    return database


DatabaseDep = Annotated[Database, Depends(get_database)]


async def get_db(database: DatabaseDep) -> AsyncIterator[AsyncSession]:
    """One session per request: committed if the handler returns, rolled back if it raises."""
    async with database.session() as session:
        yield session


async def get_read_db(database: DatabaseDep) -> AsyncIterator[AsyncSession]:
    """One read-only session per request: the database refuses writes through it."""
    async with database.read_session() as session:
        yield session


# scope="function" commits before the response is sent, so a failed commit turns into an
# error response instead of following a success the client already received.
SessionDep = Annotated[AsyncSession, Depends(get_db, scope="function")]
ReadSessionDep = Annotated[AsyncSession, Depends(get_read_db, scope="function")]
