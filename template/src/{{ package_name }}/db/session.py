"""Sessions: the factory, and the unit of work (commit when the block succeeds, roll back
when it raises)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker

from .errors import UnknownOutcomeError, describe, is_connection_failure


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

    A connection that breaks while COMMIT is under way raises UnknownOutcomeError: the work
    may have been committed or not. Failures before COMMIT (flushing the last changes
    included) raise as they are: nothing was committed then.
    """
    async with sessionmaker() as session:
        try:
            yield session
            if session.new or session.dirty or session.deleted:
                # Changes are sent before COMMIT, so that a failure here is not taken for one
                # while committing.
                await session.flush()
        except BaseException:
            await session.rollback()
            raise
        try:
            await session.commit()
        except DBAPIError as exc:
            if is_connection_failure(exc):
                raise UnknownOutcomeError(describe(exc)) from exc
            raise
