"""Migrations under real conditions: several replicas run `alembic upgrade head` at once, and
a migration meets a table that requests keep busy."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from harness.rendering import clean_env, render
from harness.services import run, scratch_database, with_database

REPLICAS = 3
# The rendered service's newest revision, which the revisions below follow.
HEAD = "0003"
# A slow revision, so that the replicas' runs overlap: without the advisory lock, the others
# read the version table while the first one is still migrating, and run the same revisions.
SLOW = f'''"""Take a while."""

from alembic import op

revision = "0098"
down_revision = "{HEAD}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("SELECT pg_sleep(3)")


def downgrade() -> None:
    pass
'''
# A revision that needs the items table to itself (ACCESS EXCLUSIVE), as most ALTERs do.
ALTER_ITEMS = f'''"""Add a column to items."""

import sqlalchemy as sa
from alembic import op

revision = "0099"
down_revision = "{HEAD}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("items", sa.Column("colour", sa.String(20)))


def downgrade() -> None:
    op.drop_column("items", "colour")
'''


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = render(tmp_path_factory.mktemp("migrate") / "service")
    run(["uv", "sync", "--quiet"], root, clean_env())
    return root


@pytest.fixture
def database(pg_admin_url: str) -> Iterator[str]:
    with scratch_database(pg_admin_url, "migrate") as name:
        yield with_database(pg_admin_url, name)


def alembic(root: Path, url: str, *args: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["uv", "run", "--no-sync", "alembic", *args],
        cwd=root,
        env=clean_env(DATABASE_URL=url, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
def test_replicas_migrating_at_once_apply_each_revision_once(service: Path, database: str) -> None:
    slow = service / "migrations" / "versions" / "20991230_0098_take_a_while.py"
    slow.write_text(SLOW)
    try:
        processes = [alembic(service, database, "upgrade", "head") for _ in range(REPLICAS)]
        outputs = [process.communicate(timeout=120)[0] for process in processes]
    finally:
        slow.unlink()
    assert [process.returncode for process in processes] == [0] * REPLICAS, outputs
    # Exactly one replica ran each revision; the others waited and found nothing to do.
    for step in (" -> 0001", f"0001 -> {HEAD}", f"{HEAD} -> 0098"):
        assert sum(output.count(f"Running upgrade {step}") for output in outputs) == 1, outputs
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [("0098",)]


@pytest.mark.slow
def test_a_migration_blocked_by_a_busy_table_fails_after_the_lock_timeout(
    service: Path, database: str
) -> None:
    assert alembic(service, database, "upgrade", "head").wait(timeout=120) == 0
    revision = service / "migrations" / "versions" / "20991231_0099_add_colour.py"
    revision.write_text(ALTER_ITEMS)
    try:
        with psycopg.connect(database) as busy:
            # A request in the middle of a transaction that read the table.
            busy.execute("SELECT count(*) FROM items")
            started = time.monotonic()
            process = alembic(service, database, "upgrade", "head", DB_MIGRATION_LOCK_TIMEOUT="1")
            output = process.communicate(timeout=60)[0]
            elapsed = time.monotonic() - started
        assert process.returncode != 0, output
        assert (
            "FAILED: a migration statement waited longer than DB_MIGRATION_LOCK_TIMEOUT" in output
        )
        assert "Traceback" not in output
        # Failed after the lock timeout, not after an import-and-connect's worth of time less.
        assert 1.0 <= elapsed < 15, elapsed
        with psycopg.connect(database) as conn:
            assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]
        # Once the table is free the same migration goes through.
        assert alembic(service, database, "upgrade", "head").wait(timeout=120) == 0
    finally:
        revision.unlink()
