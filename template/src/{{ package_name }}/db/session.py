"""Sessions: the factories, the unit of work (commit when the block succeeds, roll back when
it raises), and the rule that sends reads to the primary once their unit of work wrote."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import ORMExecuteState, Session, UOWTransaction

from .errors import UnknownOutcomeError, describe, is_connection_failure

# Session.info keys: the Writes record a session shares with the other sessions of its unit
# of work (a request), and the primary a read session turns to once that unit wrote.
WRITES = "writes"
PRIMARY = "primary"


class Writes:
    """Whether a unit of work (a request) has written through its session on the primary."""

    happened = False


class WriteSession(Session):
    """A session on the primary that records in `info["writes"]`, when set, that it wrote."""


class ReadSession(Session):
    """A read session: on the read engine (DATABASE_READ_URL), but on the primary once its
    unit of work wrote, so that it never reads older data than was just written."""

    def get_bind(self, *args: Any, **kwargs: Any) -> Engine | Connection:
        writes = self.info.get(WRITES)
        if writes is not None and writes.happened:
            primary: Engine = self.info[PRIMARY]
            return primary
        return super().get_bind(*args, **kwargs)


@event.listens_for(WriteSession, "after_flush")
def _flushed(session: Session, _flush: UOWTransaction) -> None:
    _wrote(session)


@event.listens_for(WriteSession, "do_orm_execute")
def _executed(state: ORMExecuteState) -> None:
    if state.is_insert or state.is_update or state.is_delete:
        _wrote(state.session)


def _wrote(session: Session) -> None:
    writes = session.info.get(WRITES)
    if writes is not None:
        writes.happened = True


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
                # while committing (a session with nothing pending skips the round to SQLAlchemy).
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
