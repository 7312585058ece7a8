"""Test scaffolding, not template code: the service's settings, reprs and errors, in its own
environment, while its database is down.

tests/test_secrets.py copies it into a rendered project and runs it there with the service's
URLs (passwords in them) in the environment; it prints every message it collected as a JSON
list after "MESSAGES ", and the test searches them for the passwords. It exits with an error
when a bad setting is accepted or the database answers."""

import asyncio
import json
import os
from collections.abc import Awaitable, Callable

from my_service.config import SettingsError, load_settings
from my_service.db import Database
from sqlalchemy import text

messages: list[str] = []
settings = load_settings()
messages += [repr(settings), str(settings), str(settings.database_url)]
messages += [repr(settings.database_url), repr(settings.database_read_url)]
messages += [repr(getattr(settings, "database_migration_url", None))]
url = os.environ["DATABASE_URL"]
for variable in ("database_url", "database_read_url", "database_migration_url"):
    for bad in (url.replace("postgresql://", "mysql://", 1), url.replace("/secrets", ":x/y", 1)):
        try:
            load_settings(**{variable: bad})
        except SettingsError as exc:
            messages.append(str(exc))
        else:
            raise SystemExit(f"{variable}: a bad URL was accepted")


async def read(database: Database) -> None:
    async with database.read_session() as session:
        await session.execute(text("SELECT 1"))


async def main() -> None:
    async with Database(settings) as database:
        attempts: dict[str, Callable[[], Awaitable[object]]] = {
            "ping": database.ping,
            "read": lambda: read(database),
        }
        for name, attempt in attempts.items():
            try:
                await attempt()
            except Exception as exc:
                messages.extend([str(exc), repr(exc), repr(exc.__cause__)])
            else:
                raise SystemExit(f"{name} succeeded: the database is not down")


asyncio.run(main())
print("MESSAGES", json.dumps(messages))
