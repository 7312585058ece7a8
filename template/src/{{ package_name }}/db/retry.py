"""Work that may run again as a whole: retried when the database aborted it, never once
COMMIT was sent.

When is a retry safe? When the whole unit of work runs again from the start in a new
transaction (a fresh session), and nothing outside the database happened in it (no email
sent, no message published). The database then guarantees that an aborted attempt left
nothing behind.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from .database import Database
from .errors import describe, is_connection_failure, is_transient

logger = logging.getLogger(__name__)

T = TypeVar("T")

# The first retry waits about this long; each further one twice as long, with jitter.
FIRST_DELAY_SECONDS = 0.05
MAX_DELAY_SECONDS = 2.0


async def run_in_transaction(
    database: Database,
    work: Callable[[AsyncSession], Awaitable[T]],
    *,
    attempts: int = 3,
) -> T:
    """Run `work` in a transaction of its own and commit it; run it again, in a fresh
    session after a jittered wait, when the database aborted it (serialization failure,
    deadlock) or the connection broke before COMMIT was sent; at most `attempts` times.

    Raises UnknownOutcomeError when the connection broke while committing (see
    session_scope), and the last error when every attempt failed.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1 (got {attempts})")
    for attempt in range(1, attempts + 1):
        try:
            async with database.session() as session:
                result = await work(session)
            return result
        except DBAPIError as exc:
            if attempt == attempts or not (is_transient(exc) or is_connection_failure(exc)):
                raise
            delay = min(MAX_DELAY_SECONDS, FIRST_DELAY_SECONDS * 2 ** (attempt - 1))
            delay *= random.uniform(0.5, 1.5)  # jitter: retries do not collide again
            logger.warning(
                "transaction attempt %d of %d failed (%s); retrying in %.0f ms",
                attempt,
                attempts,
                describe(exc),
                delay * 1000,
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable: the last attempt returned or raised")
