"""Liveness and database readiness probes."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..db.errors import describe
from .deps import DatabaseDep

# Upper bound for the whole readiness check, waiting for a pooled connection included.
DB_CHECK_TIMEOUT_SECONDS = 2.0

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is up; says nothing about the database."""
    return {"status": "ok"}


@router.get("/health/db", responses={503: {"description": "The database is not ready"}})
async def health_db(database: DatabaseDep) -> JSONResponse:
    """Ready when the database answers within DB_CHECK_TIMEOUT_SECONDS and the schema is in
    place. Reports the round trip, pool figures and the connection failures seen so far."""
    started = time.perf_counter()
    body: dict[str, Any]
    try:
        async with asyncio.timeout(DB_CHECK_TIMEOUT_SECONDS):
            await database.ping()
    except Exception as exc:  # any failure means "not ready"; the reason is logged, not returned
        logger.warning("database check failed: %s", describe(exc))
        body = {"status": "unavailable", "error": type(exc).__name__}
    else:
        body = {"status": "ok" if database.schema_ready else "starting"}
    body["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
    body["pool"] = database.pool_status()
    body["connection_failures"] = database.failures.connection_failures
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)
