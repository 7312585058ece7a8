"""Test scaffolding, not template code: whether a setting that one read session changed on a
replica connection is still there for the next read session on the same pooled connection.

tests/test_replica.py copies it into a rendered read_replica=true project and runs it there
with DATABASE_READ_URL pointing at a hot standby and a pool of one connection
(DB_POOL_SIZE=1, DB_MAX_OVERFLOW=0). For each setting it tries, one read session reads the
setting, SETs it to another value and reads it again; a second read session (the pool's only
connection, checked by its backend pid) reads it once more. It prints one JSON object after
"RESULT ": the standby's recovery state, and per setting what each session saw, or the error
the SET raised when the standby refused it."""

import asyncio
import json
from typing import Any

from my_service.config import load_settings
from my_service.db import Database
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

# Settings a session may change, and the value it sets.
CHANGES = {
    "default_transaction_read_only": "off",
    "application_name": "changed",
    "statement_timeout": "5min",
}


async def show(session: Any, setting: str) -> str:
    value = await session.scalar(text(f"SHOW {setting}"))
    return str(value)


async def pid(session: Any) -> int:
    return int(await session.scalar(text("SELECT pg_backend_pid()")))


async def try_change(database: Database, setting: str, value: str) -> dict[str, Any]:
    """One read session changes `setting`; the next one reads it."""
    result: dict[str, Any] = {"set_error": None, "in_session": None}
    async with database.read_session() as session:
        result["pid"] = await pid(session)
        result["before"] = await show(session, setting)
        try:
            await session.execute(text(f"SET {setting} = '{value}'"))
        except DBAPIError as exc:
            orig = exc.orig
            state = getattr(orig, "sqlstate", None)
            message = str(orig).strip().splitlines()[0] if orig is not None else str(exc)
            result["set_error"] = f"{state}: {message}"
        else:
            # Read again in the same session: the SET took effect on the connection.
            result["in_session"] = await show(session, setting)
    async with database.read_session() as session:
        result["next_pid"] = await pid(session)
        result["next_session"] = await show(session, setting)
    return result


async def main() -> dict[str, Any]:
    settings = load_settings()
    async with Database(settings) as database:
        async with database.read_session() as session:
            in_recovery = bool(await session.scalar(text("SELECT pg_is_in_recovery()")))
        pool = database.pool_status("replica")
        changes = {
            setting: await try_change(database, setting, value)
            for setting, value in CHANGES.items()
        }
    return {"in_recovery": in_recovery, "pool": pool, "changes": changes}


print("RESULT", json.dumps(asyncio.run(main())))
