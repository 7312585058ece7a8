"""Database failures as HTTP answers with a JSON body, never a traceback.

| failure                                           | answer              |
|---------------------------------------------------|---------------------|
| no free pooled connection (DB_POOL_TIMEOUT)       | 503 + Retry-After   |
| database unreachable, connection lost             | 503 + Retry-After   |
| a lock not granted in time                        | 503 + Retry-After   |
| connection lost while committing: outcome unknown | 503, no Retry-After |
| statement cancelled by its time limit             | 504                 |
| unique or foreign-key violation                   | 409                 |
| serialization failure or deadlock (PostgreSQL)    | 409 + Retry-After   |
| a value the database refuses (out of range, ...)  | 422                 |
| a request that fails validation                   | 422                 |
| a request body over MAX_BODY_BYTES                | 413                 |

This is the one place that decides these answers. Bodies carry no SQL, no parameters, no
part of the input and no credentials; the request's transaction has been rolled back by then
(the session dependency). Anything else stays a 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..db.errors import (
    UnknownOutcomeError,
    describe,
    is_busy,
    is_conflict,
    is_connection_failure,
    is_invalid_data,
    is_statement_timeout,
    is_transient,
)

logger = logging.getLogger(__name__)

RETRY_AFTER_SECONDS = 1
# Request bodies above this answer 413 before they are read into memory. A proxy in front
# usually refuses them first (nginx's client_max_body_size is 1 MB by default, and it answers
# 413 too); this limit holds when the service is reached directly.
MAX_BODY_BYTES = 1024 * 1024


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
    if is_invalid_data(exc):
        return await on_invalid_data(request, exc)
    raise exc


async def on_unknown_outcome(request: Request, exc: Exception) -> JSONResponse:
    """The connection broke while committing: the change may have been saved. No
    Retry-After: sending it again could make it twice."""
    logger.error("commit outcome unknown: %s (%s)", request.url.path, exc)
    detail = "the database connection broke while saving; check whether the change was made"
    return JSONResponse({"detail": detail}, status_code=503)


async def on_invalid_data(request: Request, exc: Exception) -> JSONResponse:
    """A value the database refused (the request's own bounds should have caught it): 422 in
    the shape of a validation error, without the value."""
    if not is_invalid_data(exc):
        raise exc
    # The route's template, not the path: the path may hold the value.
    route = getattr(request.scope.get("route"), "path", "-")
    logger.warning("value refused by the database: %s (%s)", route, describe(exc))
    problem = {"type": "invalid_data", "loc": [], "msg": "a value the database cannot store"}
    return JSONResponse({"detail": [problem]}, status_code=422)


def _text(value: object) -> str:
    # Loc parts and messages as text that JSON can encode (no lone surrogates), kept short.
    return str(value).encode("utf-8", "replace").decode()[:200]


def _problem(error: Any) -> dict[str, Any]:
    """Type, location and message of one validation error: never its input or context."""
    # The one pydantic message that quotes the input: a discriminator's tag.
    quotes_input = error["type"] == "union_tag_invalid"
    return {
        "type": error["type"],
        "loc": [part if isinstance(part, int) else _text(part) for part in error["loc"]],
        "msg": "Input tag does not match any expected tag" if quotes_input else _text(error["msg"]),
    }


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 naming each field and its problem. FastAPI's default handler repeats the input,
    and fails with a 500 on input that JSON cannot encode (NaN, a lone surrogate)."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    return JSONResponse({"detail": [_problem(e) for e in errors]}, status_code=422)


class BodySizeLimit:
    """ASGI middleware: reading a request body over `max_bytes` (by its Content-Length, or
    counted as it arrives) raises a 413 instead."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        # Checked by its digits first: int() refuses strings of thousands of digits.
        announced = length.isdigit() and (len(length) > 18 or int(length) > self.max_bytes)
        too_large = HTTPException(413, f"the request body is over {self.max_bytes} bytes")
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            if announced:
                raise too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, limited_receive, send)


def install(app: FastAPI) -> None:
    """Register the handlers on the application."""
    app.add_exception_handler(PoolTimeoutError, on_pool_timeout)
    app.add_exception_handler(DBAPIError, on_database_error)
    app.add_exception_handler(UnknownOutcomeError, on_unknown_outcome)
    # sqlite3 raises OverflowError, not a database error, for an integer beyond 64 bits.
    app.add_exception_handler(OverflowError, on_invalid_data)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_middleware(BodySizeLimit)
