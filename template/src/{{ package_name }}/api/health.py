"""Liveness and database readiness probes."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from ..db.engine import read_only
from ..db.errors import describe, stats

# Upper bound for the whole readiness check, waiting for a pooled connection included.
DB_CHECK_TIMEOUT_SECONDS = 2.0

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/health")
async def health() -> dict[str, str]:
    """The process is up; says nothing about the database."""
    return {"status": "ok"}


def pool_status(engine: AsyncEngine) -> dict[str, int]:
    """Figures of the engine's connection pool: its configured size, idle and in-use
    connections, and how many connections are open beyond the size."""
    pool = engine.pool
    if not isinstance(pool, QueuePool):
        return {}
    return {
        "size": pool.size(),
        "checked_in": pool.checkedin(),
        "checked_out": pool.checkedout(),
        # QueuePool counts overflow from -size upwards; report only connections beyond size.
        "overflow": max(0, pool.overflow()),
    }


@router.get("/health/db", responses={503: {"description": "The database is not ready"}})
async def health_db(request: Request) -> JSONResponse:
    """Ready when the database answers `SELECT 1` within DB_CHECK_TIMEOUT_SECONDS and the
    schema is in place. Reports pool figures, the round trip and connection failures."""
    engine: AsyncEngine = request.app.state.engine
    db_stats = stats(request)
    started = time.perf_counter()
    body: dict[str, Any]
    try:
        async with asyncio.timeout(DB_CHECK_TIMEOUT_SECONDS):
            async with read_only(engine).connect() as connection:
                await connection.execute(text("SELECT 1"))
    except Exception as exc:  # any failure means "not ready"; the reason is logged, not returned
        db_stats.record(exc)
        logger.warning("database check failed: %s", describe(exc))
        body = {"status": "unavailable", "error": type(exc).__name__}
    else:
        body = {"status": "ok" if request.app.state.schema_ready else "starting"}
    body["latency_ms"] = round((time.perf_counter() - started) * 1000, 2)
    body["pool"] = pool_status(engine)
    body["connection_failures"] = db_stats.connection_failures
    return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)
