"""Migrations on a live database, with real processes: many replicas run `alembic upgrade head`
at once, an owner's revision builds an index on a table that keeps being written, a build left
INVALID is built again, a migrator is killed while it holds the lock, a run waits for another
without holding a snapshot, and a migration meets a table that requests keep busy.

The default service (asyncpg, Alembic, the example), rendered once; each test adds the
revisions it needs (and removes them) and runs on a database of its own.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest

from harness.pgserver import free_port
from harness.rendering import clean_env, render
from harness.services import UV_RUN, report, run, scratch_database, wait_until, with_database

# The advisory lock of the rendered migrations/env.py: zlib.crc32(b"<package_name> migrations").
MIGRATION_LOCK_KEY = zlib.crc32(b"my_service migrations")
# Another advisory lock, which the tests hold to stop a revision where they want it.
TEST_LOCK_KEY = 4242
ALEMBIC_TIMEOUT = 300
# What every test waits for at most before it fails, naming what never happened.
STATE_TIMEOUT = 60.0
# Rows in the busy table: enough that building an index on it takes seconds.
BUSY_ROWS = 2_000_000
# The SQL of env.py's lock poll, which a migrator that waits for the lock last ran.
LOCK_POLL = "SELECT pg_try_advisory_lock(%"


def revision_file(revision: str, down_revision: str, body: str, imports: str = "") -> str:
    return f'''"""Test revision {revision}."""

{imports}from alembic import op

revision = "{revision}"
down_revision = "{down_revision}"
branch_labels = None
depends_on = None


{body}
'''


def waiting_for_others(migrators: int) -> str:
    """A revision body that holds the migration lock until every other migrator waits for it
    (its session last polled the lock), so that the runs overlap by state, not by time."""
    return f'''def upgrade() -> None:
    op.execute(
        """
        DO $$
        BEGIN
            FOR attempt IN 1..{int(STATE_TIMEOUT / 0.05)} LOOP
                PERFORM pg_stat_clear_snapshot();
                IF (SELECT count(*) FROM pg_stat_activity
                    WHERE datname = current_database() AND pid <> pg_backend_pid()
                    AND query LIKE '{LOCK_POLL}') >= {migrators - 1} THEN
                    RETURN;
                END IF;
                PERFORM pg_sleep(0.05);
            END LOOP;
            RAISE EXCEPTION 'the other migrators never all waited for the lock';
        END $$
        """
    )


def downgrade() -> None:
    pass'''


# Stops where the test wants it: waits for TEST_LOCK_KEY while the test holds it.
HELD_BY_THE_TEST = f"""def upgrade() -> None:
    op.execute("SELECT pg_advisory_lock_shared({TEST_LOCK_KEY})")
    op.execute("SELECT pg_advisory_unlock_shared({TEST_LOCK_KEY})")


def downgrade() -> None:
    pass"""

# The owner's revision: an index on a table in use (docs/database/migrations.md).
INDEX_IMPORTS = (
    "import sqlalchemy as sa\n\n"
    "from migrations.indexes import create_index_concurrently, drop_index_concurrently\n"
)
LOWER_NAME_INDEX = """def upgrade() -> None:
    create_index_concurrently("ix_items_lower_name", "items", [sa.text("lower(name)")])


def downgrade() -> None:
    drop_index_concurrently("ix_items_lower_name", "items")"""

UNIQUE_PRICE_INDEX = """def upgrade() -> None:
    create_index_concurrently("ix_items_price_cents", "items", ["price_cents"], unique=True)


def downgrade() -> None:
    drop_index_concurrently("ix_items_price_cents", "items")"""

# What the session's timeouts are in the revision after an index built outside a transaction.
RECORD_SETTINGS = """def upgrade() -> None:
    op.execute(
        "CREATE TABLE migration_settings AS SELECT current_setting('lock_timeout') AS lock_timeout,"
        " current_setting('statement_timeout') AS statement_timeout"
    )


def downgrade() -> None:
    op.execute("DROP TABLE migration_settings")"""

# A revision that needs the items table to itself (ACCESS EXCLUSIVE), as most ALTERs do.
ADD_COLOUR = """def upgrade() -> None:
    op.add_column("items", sa.Column("colour", sa.Text()))


def downgrade() -> None:
    op.drop_column("items", "colour")"""


@dataclass
class Service:
    root: Path
    # The revisions' upgrade steps, oldest first: (down revision or "", revision).
    steps: list[tuple[str, str]]

    @property
    def head(self) -> str:
        return self.steps[-1][1]

    @contextlib.contextmanager
    def revisions(self, *files: tuple[str, str]) -> Iterator[None]:
        """Revision files (name, text) in migrations/versions/ for the block."""
        paths = [self.root / "migrations" / "versions" / name for name, _ in files]
        try:
            for path, (_, text) in zip(paths, files, strict=True):
                path.write_text(text)
            yield
        finally:
            for path in paths:
                path.unlink(missing_ok=True)


def upgrade_steps(output: str) -> list[tuple[str, str]]:
    return re.findall(r"Running upgrade (\w*) -> (\w+)", output)


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Service:
    root = render(tmp_path_factory.mktemp("migrate") / "service")
    run(["uv", "sync", "--quiet"], root, clean_env())
    # Offline, so no database is needed: the steps from base to head (each is in the log and
    # in an SQL comment).
    offline = run([*UV_RUN, "alembic", "upgrade", "head", "--sql"], root, clean_env())
    return Service(root, list(dict.fromkeys(upgrade_steps(offline))))


@pytest.fixture
def database(pg_admin_url: str) -> Iterator[str]:
    with scratch_database(pg_admin_url, "migrate") as name:
        yield with_database(pg_admin_url, name)


def alembic(root: Path, url: str, *args: str, **env: str) -> subprocess.Popen[str]:
    """`alembic ARGS` in its own process group (so that a kill reaches Python under uv)."""
    return subprocess.Popen(
        [*UV_RUN, "alembic", *args],
        cwd=root,
        env=clean_env(DATABASE_URL=url, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def upgrade(root: Path, url: str, **env: str) -> str:
    process = alembic(root, url, "upgrade", "head", **env)
    output = process.communicate(timeout=ALEMBIC_TIMEOUT)[0]
    assert process.returncode == 0, output
    return output


def query(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        cursor = conn.execute(sql, params or None)
        return cursor.fetchall() if cursor.description is not None else []


def version(url: str) -> list[tuple[Any, ...]]:
    return query(url, "SELECT version_num FROM alembic_version")


def index_state(url: str, name: str) -> tuple[Any, ...] | None:
    """(oid, valid, unique) of the index, or None."""
    rows = query(
        url,
        "SELECT indexrelid::bigint, indisvalid, indisunique FROM pg_index "
        "WHERE indexrelid = to_regclass(%s)",
        name,
    )
    return rows[0] if rows else None


def lock_holders(url: str, key: int) -> list[tuple[Any, ...]]:
    """(pid, granted) of each session that holds or waits for advisory lock `key` here."""
    return query(
        url,
        "SELECT pid, granted FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 "
        "AND classid = 0 AND objid::bigint = %s "
        "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        key,
    )


def lock_pollers(url: str) -> list[int]:
    """The sessions of migrators that wait for the migration lock (last ran its poll)."""
    rows = query(
        url,
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND pid <> pg_backend_pid() AND query LIKE %s",
        LOCK_POLL,
    )
    return [row[0] for row in rows]


@pytest.mark.slow
@pytest.mark.parametrize("migrators", [2, 10])
def test_migrators_started_at_once_apply_each_revision_once(
    service: Service, database: str, migrators: int
) -> None:
    slow = (
        "20991230_0098_wait_for_the_others.py",
        revision_file("0098", service.head, waiting_for_others(migrators)),
    )
    with service.revisions(slow):
        processes = [alembic(service.root, database, "upgrade", "head") for _ in range(migrators)]
        outputs = [process.communicate(timeout=ALEMBIC_TIMEOUT)[0] for process in processes]
    assert [process.returncode for process in processes] == [0] * migrators, outputs
    # Exactly one ran each revision; the others waited (0098 saw them) and found nothing to do.
    ran = [step for output in outputs for step in upgrade_steps(output)]
    assert sorted(ran) == sorted([*service.steps, (service.head, "0098")]), outputs
    assert version(database) == [("0098",)]


@dataclass
class Background:
    """Work on the database in a thread of its own (`_run`), until `finish()`."""

    url: str
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        raise NotImplementedError

    def _join(self) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), f"{type(self).__name__} did not stop"


@dataclass
class Writes(Background):
    """Writes to items, one at a time on a connection of their own, until stopped: an INSERT,
    then an UPDATE of an older row. Each is kept as (started, ended, error)."""

    done: list[tuple[float, float, str | None]] = field(default_factory=list)

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            n = 0
            while not self.stop.is_set():
                n += 1
                for sql, params in (
                    ("INSERT INTO items (name, price_cents) VALUES (%s, %s)", (f"w-{n}", n)),
                    ("UPDATE items SET price_cents = price_cents + 1 WHERE id = %s", (n,)),
                ):
                    started = time.monotonic()
                    error = None
                    try:
                        conn.execute(sql, params)
                    except psycopg.Error as exc:
                        error = f"{type(exc).__name__}: {exc}"
                    self.done.append((started, time.monotonic(), error))

    def finish(self) -> None:
        self._join()


@dataclass
class BuildWatch(Background):
    """When an index build ran on the database, from pg_stat_progress_create_index, polled
    on a connection of its own until stopped."""

    seen: list[tuple[float, str]] = field(default_factory=list)

    def _run(self) -> None:
        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            while not self.stop.wait(0.01):
                rows = conn.execute(
                    "SELECT phase FROM pg_stat_progress_create_index "
                    "WHERE datid = (SELECT oid FROM pg_database WHERE datname = current_database())"
                ).fetchall()
                self.seen.extend((time.monotonic(), row[0]) for row in rows)

    def finish(self) -> tuple[float, float]:
        self._join()
        assert self.seen, "no index build was seen in pg_stat_progress_create_index"
        return self.seen[0][0], self.seen[-1][0]


@pytest.mark.slow
def test_an_index_on_a_busy_table_is_built_while_writes_go_on(
    service: Service, database: str, record_property: Callable[[str, Any], None]
) -> None:
    """Two migrators at once, one revision building an index CONCURRENTLY on a table of
    BUSY_ROWS rows while another connection writes to it: both exit 0, the index is valid,
    and writes completed during the build, none failed."""
    upgrade(service.root, database)
    query(
        database,
        "INSERT INTO items (name, price_cents) "
        "SELECT 'item-' || n, n FROM generate_series(1, %s) n",
        BUSY_ROWS,
    )
    index = (
        "20991230_0098_index_lower_name.py",
        revision_file("0098", service.head, LOWER_NAME_INDEX, INDEX_IMPORTS),
    )
    record = ("20991231_0099_record_settings.py", revision_file("0099", "0098", RECORD_SETTINGS))
    writes = Writes(database)
    watch = BuildWatch(database)
    with service.revisions(index, record):
        writes.start()
        watch.start()
        try:
            wait_until(lambda: len(writes.done) >= 10, STATE_TIMEOUT, "the writes started")
            processes = [alembic(service.root, database, "upgrade", "head") for _ in range(2)]
            outputs = [process.communicate(timeout=ALEMBIC_TIMEOUT)[0] for process in processes]
        finally:
            writes.finish()
            build_start, build_end = watch.finish()
    during = [w for w in writes.done if build_start <= w[1] <= build_end]
    failed = [w[2] for w in writes.done if w[2] is not None]
    latency = max((end - start for start, end, _ in during), default=0.0)
    phases = sorted({phase for _, phase in watch.seen})
    report(
        record_property,
        "index on a busy table",
        f"{BUSY_ROWS} rows; build seen for {build_end - build_start:.2f} s ({len(phases)} phases); "
        f"{len(during)} writes completed during it, max latency {latency * 1000:.0f} ms; "
        f"{len(writes.done)} writes in all, {len(failed)} failed",
    )

    assert [process.returncode for process in processes] == [0, 0], outputs
    ran = [step for output in outputs for step in upgrade_steps(output)]
    assert sorted(ran) == [(service.head, "0098"), ("0098", "0099")], outputs
    built = index_state(database, "ix_items_lower_name")
    assert built is not None, "no index ix_items_lower_name"
    assert built[1:] == (True, False), built
    assert not failed, failed[:5]
    assert during, f"no write completed while the index was built: {phases}"
    # The session's timeouts held across the build outside a transaction, into the next revision.
    assert query(database, "SELECT * FROM migration_settings") == [("5s", "1h")]


@pytest.mark.slow
def test_an_index_left_invalid_is_dropped_and_built_again(service: Service, database: str) -> None:
    """A unique index over duplicates fails, clearly, and is left INVALID; once the data is
    fixed, the next run drops it and builds it again."""
    upgrade(service.root, database)
    query(
        database,
        "INSERT INTO items (name, price_cents) "
        "SELECT 'item-' || n, n % 10 FROM generate_series(1, 1000) n",
    )
    unique = (
        "20991230_0098_unique_price.py",
        revision_file("0098", service.head, UNIQUE_PRICE_INDEX, INDEX_IMPORTS),
    )
    with service.revisions(unique):
        process = alembic(service.root, database, "upgrade", "head")
        output = process.communicate(timeout=ALEMBIC_TIMEOUT)[0]
        assert process.returncode != 0, output
        assert (
            "FAILED: building index ix_items_price_cents on items CONCURRENTLY did not finish: "
            "items holds duplicate values for this unique index" in output
        ), output
        assert "Traceback" not in output, output
        left = index_state(database, "ix_items_price_cents")
        assert left is not None, "the failed build left no index"
        assert left[1:] == (False, True), left
        assert version(database) == [(service.head,)]

        query(database, "UPDATE items SET price_cents = id")
        upgrade(service.root, database)
    rebuilt = index_state(database, "ix_items_price_cents")
    assert rebuilt is not None
    assert rebuilt[1:] == (True, True)
    assert rebuilt[0] != left[0], "the INVALID index was kept instead of built again"
    assert version(database) == [("0098",)]


@pytest.mark.slow
def test_the_rendered_round_trips_pass_with_an_index_built_concurrently(
    service: Service, pg_admin_url: str
) -> None:
    """The service's own migration tests run every revision inside a transaction of theirs
    (and through an engine): there the index is built without CONCURRENTLY."""
    index = (
        "20991230_0098_index_lower_name.py",
        revision_file("0098", service.head, LOWER_NAME_INDEX, INDEX_IMPORTS),
    )
    with service.revisions(index):
        output = run(
            [
                *UV_RUN,
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                "tests/test_migrations.py",
                "-k",
                "round_trip",
            ],
            service.root,
            clean_env(TEST_DATABASE_URL=pg_admin_url),
        )
    assert re.search(r"\b3 passed\b", output), output


@pytest.mark.slow
def test_offline_sql_sets_the_timeouts_before_any_ddl(service: Service) -> None:
    """`--sql` needs no database (DATABASE_URL points where nothing listens), and carries the
    same session timeouts as a run, first: for the whole history, one step, and a step that
    builds an index outside a transaction."""
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
    timeouts = {"DB_MIGRATION_LOCK_TIMEOUT": "2.5", "DB_MIGRATION_STATEMENT_TIMEOUT": "600"}
    down, last = service.steps[-1]
    index = (
        "20991230_0098_index_lower_name.py",
        revision_file("0098", service.head, LOWER_NAME_INDEX, INDEX_IMPORTS),
    )
    with service.revisions(index):
        scripts = {
            target: run(
                [*UV_RUN, "alembic", "upgrade", target, "--sql"],
                service.root,
                clean_env(DATABASE_URL=nowhere, **timeouts),
            )
            for target in ("head", f"{down}:{last}", f"{last}:0098")
        }
    for target, script in scripts.items():
        statements = [
            s.strip() for s in script.split(";") if s.strip() and not s.strip().startswith("INFO")
        ]
        ddl = [
            i
            for i, s in enumerate(statements)
            if re.match(r"(--[^\n]*\n\s*)*(CREATE|ALTER|DROP)\b", s)
        ]
        assert ddl, f"no DDL in the SQL of {target}:\n{script}"
        assert statements[:2] == [
            "SET lock_timeout = '2500ms'",
            "SET statement_timeout = '600s'",
        ], f"{target}:\n{script}"
    # The index is built outside the revision's transaction: COMMIT before it, BEGIN after.
    script = re.sub(r"\s+", " ", scripts[f"{last}:0098"])
    assert re.search(
        r"COMMIT; .*SET lock_timeout = 0; CREATE INDEX CONCURRENTLY IF NOT EXISTS "
        r"ix_items_lower_name ON items \(lower\(name\)\); "
        r"SELECT set_config\('lock_timeout'.*; BEGIN; UPDATE alembic_version",
        script,
    ), script


@pytest.mark.slow
def test_a_killed_migrator_leaves_the_lock_free(service: Service, database: str) -> None:
    """SIGKILL to a migrator in the middle of a revision, while it holds the lock: its session
    ends, the lock with it, its revision is rolled back, and the next run applies it."""
    upgrade(service.root, database)
    held = ("20991230_0098_held.py", revision_file("0098", service.head, HELD_BY_THE_TEST))
    with service.revisions(held), psycopg.connect(database, autocommit=True) as test:
        test.execute("SELECT pg_advisory_lock(%s)", (TEST_LOCK_KEY,))
        process = alembic(service.root, database, "upgrade", "head")
        try:
            # The migrator holds the migration lock and waits in revision 0098.
            wait_until(
                lambda: (
                    {p for p, granted in lock_holders(database, TEST_LOCK_KEY) if not granted}
                    & {p for p, granted in lock_holders(database, MIGRATION_LOCK_KEY) if granted}
                ),
                STATE_TIMEOUT,
                "a migrator holding the lock inside revision 0098",
            )
        finally:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        # Its server process notices the client is gone once the statement it runs ends.
        test.execute("SELECT pg_advisory_unlock(%s)", (TEST_LOCK_KEY,))
        wait_until(
            lambda: not lock_holders(database, MIGRATION_LOCK_KEY),
            STATE_TIMEOUT,
            "the killed migrator's lock was released",
        )
        assert version(database) == [(service.head,)]
        output = upgrade(service.root, database)
    assert upgrade_steps(output) == [(service.head, "0098")], output
    assert version(database) == [("0098",)]


@pytest.mark.slow
def test_a_waiting_migrator_holds_no_transaction(service: Service, database: str) -> None:
    """While another session holds the migration lock, a migrator waits idle, outside any
    transaction: an index built CONCURRENTLY meanwhile does not wait for it."""
    upgrade(service.root, database)
    with psycopg.connect(database, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        process = alembic(service.root, database, "upgrade", "head")
        try:
            wait_until(lambda: lock_pollers(database), STATE_TIMEOUT, "a migrator polling the lock")
            samples = [
                query(
                    database,
                    "SELECT state, backend_xmin IS NULL, backend_xid IS NULL "
                    "FROM pg_stat_activity WHERE pid = %s",
                    lock_pollers(database)[0],
                )[0]
                for _ in range(50)
            ]
            # The snapshot a waiting transaction held would make this wait, then time out.
            with psycopg.connect(database, autocommit=True) as builder:
                builder.execute("SET lock_timeout = '10s'")
                builder.execute("CREATE INDEX CONCURRENTLY ix_probe ON items (price_cents)")
                builder.execute("DROP INDEX CONCURRENTLY ix_probe")
        finally:
            holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
        output = process.communicate(timeout=ALEMBIC_TIMEOUT)[0]
    assert process.returncode == 0, output
    assert not [s for s in samples if s[0] == "idle in transaction" or not s[2]], samples
    assert ("idle", True, True) in samples, samples


@pytest.mark.slow
def test_the_wait_for_the_lock_is_bounded(service: Service, database: str) -> None:
    """A run that cannot get the lock within DB_MIGRATION_STATEMENT_TIMEOUT fails, naming the
    server process that holds it, and changes nothing."""
    with psycopg.connect(database, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        pid = holder.info.backend_pid
        process = alembic(
            service.root, database, "upgrade", "head", DB_MIGRATION_STATEMENT_TIMEOUT="1"
        )
        output = process.communicate(timeout=ALEMBIC_TIMEOUT)[0]
    assert process.returncode != 0, output
    assert (
        "FAILED: waited DB_MIGRATION_STATEMENT_TIMEOUT (1 s) for the migration lock "
        f"(advisory lock {MIGRATION_LOCK_KEY}) that another migration run holds: server "
        f"process {pid} (idle" in output
    ), output
    assert "Traceback" not in output, output
    assert query(database, "SELECT to_regclass('alembic_version')") == [(None,)]


@pytest.mark.slow
def test_a_migration_blocked_by_a_busy_table_fails_after_the_lock_timeout(
    service: Service, database: str, record_property: Callable[[str, Any], None]
) -> None:
    upgrade(service.root, database)
    colour = (
        "20991231_0099_add_colour.py",
        revision_file("0099", service.head, ADD_COLOUR, "import sqlalchemy as sa\n"),
    )
    with service.revisions(colour):
        with psycopg.connect(database) as busy:
            # A request in the middle of a transaction that read the table.
            busy.execute("SELECT count(*) FROM items")
            started = time.monotonic()
            process = alembic(
                service.root, database, "upgrade", "head", DB_MIGRATION_LOCK_TIMEOUT="1"
            )
            output = process.communicate(timeout=ALEMBIC_TIMEOUT)[0]
            elapsed = time.monotonic() - started
        report(
            record_property,
            "busy table",
            f"failed {elapsed:.2f} s after it started (DB_MIGRATION_LOCK_TIMEOUT=1)",
        )
        assert process.returncode != 0, output
        assert (
            "FAILED: a migration statement waited longer than DB_MIGRATION_LOCK_TIMEOUT (1 s) "
            "for a table in use; nothing was changed" in output
        ), output
        assert "Traceback" not in output
        assert version(database) == [(service.head,)]
        columns = query(
            database,
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'items'",
        )
        assert ("colour",) not in columns
        # Once the table is free the same migration goes through.
        upgrade(service.root, database)
    assert version(database) == [("0099",)]
