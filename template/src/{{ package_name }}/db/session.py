"""Sessions: one per request through `get_db`, or `session_scope` outside requests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, cast

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker


def make_sessionmaker(
    bind: AsyncEngine | AsyncConnection, **options: Any
) -> async_sessionmaker[AsyncSession]:
    """Session factory. Objects stay usable after commit: in async code an expired
    attribute would need I/O on access, which raises MissingGreenlet."""
    return async_sessionmaker(bind, expire_on_commit=False, **options)


@asynccontextmanager
async def session_scope(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """A session that commits when the block succeeds and rolls back when it raises.

    For scripts and background jobs:

        async with session_scope(sessionmaker) as session:
            session.add(obj)
    """
    async with sessionmaker() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        await session.commit()


# The two factories below are `async def` although they never await: FastAPI runs a plain
# `def` dependency in its thread pool, a thread hop on every request.
async def get_sessionmaker(request: Request) -> async_sessionmaker[AsyncSession]:
    """The session factory the application's lifespan created."""
    return cast(async_sessionmaker[AsyncSession], request.app.state.sessionmaker)


async def get_db(
    sessionmaker: Annotated[async_sessionmaker[AsyncSession], Depends(get_sessionmaker)],
) -> AsyncIterator[AsyncSession]:
    """One session per request: committed if the handler returns, rolled back if it raises."""
    async with session_scope(sessionmaker) as session:
        yield session


async def get_read_sessionmaker(request: Request) -> async_sessionmaker[AsyncSession]:
    """The session factory for read-only work (DATABASE_READ_URL, or the primary)."""
    return cast(async_sessionmaker[AsyncSession], request.app.state.read_sessionmaker)


async def get_read_db(
    sessionmaker: Annotated[async_sessionmaker[AsyncSession], Depends(get_read_sessionmaker)],
) -> AsyncIterator[AsyncSession]:
    """One read-only session per request: the database refuses writes through it."""
    async with session_scope(sessionmaker) as session:
        yield session


# scope="function" commits before the response is sent, so a failed commit turns into an
# error response instead of following a success the client already received.
SessionDep = Annotated[AsyncSession, Depends(get_db, scope="function")]
ReadSessionDep = Annotated[AsyncSession, Depends(get_read_db, scope="function")]
