"""Test scaffolding, not template code: what the service's own Database makes of its TLS
settings against a given server.

tests/test_tls.py copies it into a rendered PostgreSQL project and runs it there with one
argument, a JSON object of cases: name -> settings (database_url, db_ssl_mode and, for
verify-full, db_ssl_ca_file). For each case it builds the settings with load_settings(),
pings the database as /health/db does, and reads the connection's row of pg_stat_ssl. It
prints one JSON object after "RESULT ": name -> {"ssl": ..., "version": ...} when the
connection was made, or {"errors": [exception classes, outermost first, following
__cause__], "message": ...} when it failed."""

import asyncio
import json
import sys
from typing import Any

from my_service.config import load_settings
from my_service.db import Database
from sqlalchemy import text


def qualified(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__qualname__}"


def chain(exc: BaseException) -> list[str]:
    """The classes of `exc` and of the exceptions it was raised from."""
    found: list[str] = []
    current: BaseException | None = exc
    while current is not None and len(found) < 10:
        found.append(qualified(current))
        current = current.__cause__
    return found


async def attempt(settings: dict[str, Any]) -> dict[str, Any]:
    async with Database(load_settings(**settings)) as database:
        try:
            await database.ping()
            async with database.session() as session:
                row = (
                    await session.execute(
                        text("SELECT ssl, version FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                    )
                ).one()
        except Exception as exc:
            return {"errors": chain(exc), "message": str(exc)}
    return {"ssl": row.ssl, "version": row.version}


async def main(cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {name: await attempt(settings) for name, settings in cases.items()}


print("RESULT", json.dumps(asyncio.run(main(json.loads(sys.argv[1])))))
