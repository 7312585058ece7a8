"""Database failures as HTTP answers with a JSON body, never a traceback.

| failure                                          | answer            |
|--------------------------------------------------|-------------------|
| no free pooled connection (DB_POOL_TIMEOUT)      | 503 + Retry-After |
| database unreachable, connection lost            | 503 + Retry-After |
| a lock not granted in time                       | 503 + Retry-After |
| statement cancelled by its time limit            | 504               |
| unique or foreign-key violation                  | 409               |
| serialization failure or deadlock (PostgreSQL)   | 409 + Retry-After |

This is the one place that decides these answers. Bodies carry no SQL, no parameters and no
credentials; the request's transaction has been rolled back by then (the session
dependency). Anything else stays a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from ..db.errors import (
    describe,
    is_busy,
    is_conflict,
    is_connection_failure,
    is_statement_timeout,
    is_transient,
)

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1


def unavailable(detail: str) -> JSONResponse:
    return JSONResponse(
        {"detail": detail},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def on_pool_timeout(request: Request, exc: Exception) -> JSONResponse:
    logger.warning("no free database connection within DB_POOL_TIMEOUT: %s", request.url.path)
    return unavailable("the database is busy; try again shortly")


async def on_database_error(request: Request, exc: Exception) -> JSONResponse:
    if is_statement_timeout(exc):
        logger.warning("statement cancelled by DB_STATEMENT_TIMEOUT: %s", request.url.path)
        return JSONResponse({"detail": "the database query took too long"}, status_code=504)
    if is_connection_failure(exc):
        logger.warning("database unavailable: %s", describe(exc))
        return unavailable("the database is unavailable; try again shortly")
    if is_busy(exc):
        logger.warning("database lock not granted in time: %s", request.url.path)
        return unavailable("the database is busy; try again shortly")
    if is_conflict(exc):
        return JSONResponse({"detail": "the request conflicts with existing data"}, status_code=409)
    if is_transient(exc):
        # Nothing was written; the same request may succeed when sent again.
        return JSONResponse(
            {"detail": "the request conflicted with a concurrent one; try again"},
            status_code=409,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    raise exc


def install(app: FastAPI) -> None:
    """Register the handlers on the application."""
    app.add_exception_handler(PoolTimeoutError, on_pool_timeout)
    app.add_exception_handler(DBAPIError, on_database_error)
