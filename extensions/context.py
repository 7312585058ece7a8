"""Derived facts for the templates, computed once from the answers.

Copier runs this hook in every rendering phase, including while question defaults and
validators are rendered, before all answers exist: every answer is read with ``.get()``.
"""

from __future__ import annotations

import keyword
import sys
from typing import Any

from copier_template_extensions import ContextHook

# driver answer -> facts about it
DRIVERS: dict[str, dict[str, Any]] = {
    "asyncpg": {
        "url_scheme": "postgresql+asyncpg",
        "driver_requirement": "asyncpg>=0.30",
        "is_postgres": True,
    },
    "psycopg": {
        "url_scheme": "postgresql+psycopg",
        "driver_requirement": "psycopg[binary]>=3.2",
        "is_postgres": True,
    },
    "aiosqlite": {
        "url_scheme": "sqlite+aiosqlite",
        "driver_requirement": "aiosqlite>=0.20",
        "is_postgres": False,
    },
}

# Import names a package_name must not shadow: the standard library, what the service
# depends on, and the top-level folders of the rendered project.
RESERVED_PACKAGE_NAMES = sorted(
    set(sys.stdlib_module_names)
    | {
        "aiosqlite",
        "alembic",
        "asgi_lifespan",
        "asyncpg",
        "fastapi",
        "httpx",
        "migrations",
        "mypy",
        "psycopg",
        "pydantic",
        "pydantic_settings",
        "pytest",
        "ruff",
        "sqlalchemy",
        "starlette",
        "tests",
        "uvicorn",
    }
)


class DatabaseFacts(ContextHook):
    """Adds driver facts and validation helpers to the rendering context."""

    def hook(self, context: dict[str, Any]) -> None:
        driver = context.get("db_driver") or "asyncpg"
        facts = DRIVERS.get(driver, DRIVERS["asyncpg"])
        is_postgres = facts["is_postgres"]
        db_name = context.get("db_name") or "app"
        # PgBouncer in transaction mode: no prepared statements, no session-level settings.
        uses_pooler = is_postgres and context.get("db_pooler") == "pgbouncer"
        use_alembic = context.get("migrations", "alembic") == "alembic"
        # The URL without the driver: what .env.example shows, so that a .env written for one
        # PostgreSQL driver keeps working after switching to the other.
        if is_postgres:
            # PgBouncer listens on 6432 by convention, PostgreSQL on 5432.
            port = 6432 if uses_pooler else 5432
            portable_url = f"postgresql://postgres@localhost:{port}/{db_name}"
        else:
            portable_url = f"sqlite:///./{db_name}.db"
        context.update(
            {
                "python_keywords": [*keyword.kwlist, *keyword.softkwlist],
                "reserved_package_names": RESERVED_PACKAGE_NAMES,
                "is_postgres": is_postgres,
                "is_sqlite": not is_postgres,
                "is_asyncpg": driver == "asyncpg",
                "is_psycopg": driver == "psycopg",
                "uses_pooler": uses_pooler,
                # A read replica behind ReadSessionDep (DATABASE_READ_URL): PostgreSQL only.
                "has_replica": is_postgres and context.get("read_replica") is True,
                "use_alembic": use_alembic,
                # The example's ids, prices and versions: bigint on PostgreSQL, except in
                # services made before 0.4.0, which keep the integer columns they created.
                "bigint_ids": is_postgres and context.get("id_type", "bigint") == "bigint",
                # DATABASE_MIGRATION_URL: migrations as the schema owner (PostgreSQL).
                "has_migration_url": is_postgres and use_alembic,
                "url_scheme": facts["url_scheme"],
                "driver_requirement": facts["driver_requirement"],
                "portable_database_url": portable_url,
                "default_database_url": facts["url_scheme"] + ":" + portable_url.split(":", 1)[1],
                # The per-driver part of the engine (db/driver.py).
                "driver_include": f"includes/driver/{driver}.py.jinja",
                "project_slug": (context.get("package_name") or "app").replace("_", "-"),
            }
        )
