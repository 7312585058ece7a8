"""Session factories, and the unit of work: commit when the block succeeds, roll back when
it raises."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

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
    """A session that commits when the block succeeds and rolls back when it raises."""
    async with sessionmaker() as session:
        try:
            yield session
        except BaseException:
            await session.rollback()
            raise
        await session.commit()
