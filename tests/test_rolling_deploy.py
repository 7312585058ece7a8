"""A rolling deploy of the rendered service under load, for real, as docs/database/deploys.md
describes it: two instances of release N behind HAProxy; release N+1's expand revision (a
column with a default, an index built concurrently, the first step of renaming a column with a
trigger that keeps both columns in step) applied while requests run; then each instance
drained, stopped and replaced by release N+1 in turn. No request fails, no acknowledged write
is lost, and release N's code serves on the new schema. And a migration that meets a long
transaction gives up after DB_MIGRATION_LOCK_TIMEOUT, changes nothing, and the requests
queued behind it go on.

Real processes only: PostgreSQL, HAProxy, the service under uvicorn, `alembic upgrade head`.
Events are ordered by polling real state (answers seen, HAProxy's stats, pg_locks); every wait
is bounded in count and time. Latencies are reported, never asserted.
"""

from __future__ import annotations

import asyncio
import math
import re
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from harness.loadbalancer import SERVED_BY, HAProxy
from harness.rendering import clean_env
from harness.services import (
    UV_RUN,
    Service,
    drive_load,
    migrate,
    render_synced,
    report,
    run,
    running_service,
    scratch_database,
    wait_until,
    with_database,
)

CONCURRENCY = 16
SEED_ITEMS = 40
# Answers to see in each step before the next one starts.
BEFORE_ANSWERS = 300
OLD_CODE_NEW_SCHEMA_ANSWERS = 200
AFTER_ANSWERS = 300
# Bound of the load's length in requests; the scenario ends it well before.
MAX_REQUESTS = 100_000
REQUEST_TIMEOUT = 30.0
LOAD_TIMEOUT = 150.0
STEP_TIMEOUT = 60.0
READY_TIMEOUT = 30.0
SLOTS = ("app1", "app2")
# The long-transaction scenario: how long a migration statement may wait for the table.
LOCK_TIMEOUT_SECONDS = 1
# Requests that queued behind the waiting migration must be answered by this many seconds
# after the migration gave up (a bound, not a measurement).
QUEUED_ANSWER_BOUND = 10.0

# An HAProxy request log line (option httplog) of an answer other than 2xx.
NOT_2XX_LOG_LINE = re.compile(r"^\S+ \[[^\]]+\] \S+ \S+ \S+ (?!2)\d{3} ")

NEXT_REVISION = "0900"
# Release N+1's revision, on top of the project's head: only changes that old code can live
# with (expand). `stock` has a server default; `details` will replace `description`, and until
# every release reads it, a trigger copies whichever of the two a statement wrote.
EXPAND = '''"""Release N+1, expand: stock, an index on price_cents, details for description.

Revision ID: {revision}
Revises: {head}
"""

import sqlalchemy as sa
from alembic import context, op

from migrations.indexes import create_index_concurrently, drop_index_concurrently

revision = "{revision}"
down_revision = "{head}"
branch_labels = None
depends_on = None

BATCH = 500

SYNC_FUNCTION = """
CREATE FUNCTION items_sync_details() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.details := coalesce(NEW.details, NEW.description);
        NEW.description := coalesce(NEW.description, NEW.details);
    ELSIF NEW.description IS DISTINCT FROM OLD.description THEN
        NEW.details := NEW.description;
    ELSIF NEW.details IS DISTINCT FROM OLD.details THEN
        NEW.description := NEW.details;
    END IF;
    RETURN NEW;
END
$$
"""


def upgrade() -> None:
    op.add_column("items", sa.Column("stock", sa.BigInteger(), server_default="0", nullable=False))
    op.add_column("items", sa.Column("details", sa.Text(), nullable=True))
    op.execute(SYNC_FUNCTION)
    op.execute(
        "CREATE TRIGGER items_sync_details BEFORE INSERT OR UPDATE ON items "
        "FOR EACH ROW EXECUTE FUNCTION items_sync_details()"
    )
    create_index_concurrently("ix_items_price_cents", "items", ["price_cents"])
    if context.is_offline_mode():
        return
    # The rows written before the trigger, a batch per transaction.
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        last = bind.scalar(sa.text("SELECT max(id) FROM items")) or 0
        for start in range(0, last, BATCH):
            bind.execute(
                sa.text(
                    "UPDATE items SET details = description WHERE id > :start AND id <= :end "
                    "AND details IS DISTINCT FROM description"
                ),
                {{"start": start, "end": start + BATCH}},
            )


def downgrade() -> None:
    op.execute("DROP TRIGGER items_sync_details ON items")
    op.execute("DROP FUNCTION items_sync_details()")
    drop_index_concurrently("ix_items_price_cents", "items")
    op.drop_column("items", "details")
    op.drop_column("items", "stock")
'''
# Release N+1's code, appended to the rendered modules: the model maps what the revision added
# (it reads and writes description; the trigger fills details), and answers carry `stock`,
# which tells them apart from release N's.
NEXT_MODEL = """

# Release N+1: what the expand revision added.
from sqlalchemy import BigInteger, Index, Text  # noqa: E402
from sqlalchemy.orm import mapped_column  # noqa: E402

Item.stock = mapped_column(BigInteger, server_default="0", nullable=False)
Item.details = mapped_column(Text)
Index("ix_items_price_cents", Item.price_cents)
"""
NEXT_SCHEMA = """

class _ItemReadWithStock(ItemRead):
    stock: int


ItemRead = _ItemReadWithStock
"""
# The long-transaction scenario's revision: ADD COLUMN needs the table to itself.
ALTER_ITEMS = '''"""Add a column to items."""

import sqlalchemy as sa
from alembic import op

revision = "0901"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("items", sa.Column("colour", sa.Text()))


def downgrade() -> None:
    op.drop_column("items", "colour")
'''


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default service, rendered and synced once; each test restores what it changes."""
    return render_synced(
        tmp_path_factory.mktemp("rolling") / "service",
        db_driver="asyncpg",
        migrations="alembic",
        with_example=True,
    )


@pytest.fixture
def database(project: Path, pg_admin_url: str) -> Iterator[str]:
    """A new database migrated to the project's head (release N)."""
    with scratch_database(pg_admin_url, "deploy") as name:
        url = with_database(pg_admin_url, name)
        migrate(project, url)
        yield url


def head_revision(root: Path) -> str:
    output = run([*UV_RUN, "alembic", "heads"], root, clean_env())
    heads = [line.split()[0] for line in output.splitlines() if line.endswith("(head)")]
    assert len(heads) == 1, f"the project has not one head:\n{output}"
    return heads[0]


class Changes:
    """Files written or appended to in a project, put back as they were by restore()."""

    def __init__(self) -> None:
        self.saved: dict[Path, str | None] = {}

    def write(self, path: Path, text: str, *, append: bool = False) -> None:
        before = path.read_text() if path.exists() else None
        self.saved.setdefault(path, before)
        path.write_text((before or "") + text if append else text)

    def restore(self) -> None:
        for path, text in self.saved.items():
            if text is None:
                path.unlink(missing_ok=True)
            else:
                path.write_text(text)


@dataclass
class Answer:
    """One request through the load: what it was, when (time.perf_counter()) and what it got."""

    kind: str
    started: float
    done: float
    status: int | None  # None: no HTTP answer (transport error)
    detail: str  # the error, or the start of a body that is not a success
    served_by: str  # HAProxy's server slot, or "-"
    release: str  # "N+1" when the item in the answer has `stock`, else "N"

    @property
    def latency(self) -> float:
        return self.done - self.started


@dataclass
class Load:
    """Reads (GET /items/{id}), creates (POST /items) and changes (PATCH /items/{id} with
    If-Match) until `finished` is set. Each client changes only the items it created, one
    request at a time, so what it last got acknowledged is what the database must hold."""

    base_url: str
    ids: list[int]
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    answers: list[Answer] = field(default_factory=list)
    # Acknowledged state per item id: name, description, price_cents, version (its ETag).
    acknowledged: dict[int, dict[str, Any]] = field(default_factory=dict)
    writes: Counter[str] = field(default_factory=Counter)
    owned: dict[int, list[int]] = field(default_factory=dict)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    # (phase, the time.perf_counter() it starts at), in order.
    marks: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, phase: str) -> float:
        now = time.perf_counter()
        self.marks.append((phase, now))
        return now

    def phase(self, at: float) -> str:
        return [name for name, start in self.marks if start <= at][-1]

    def since(self, moment: float) -> list[Answer]:
        return [answer for answer in self.answers if answer.started >= moment]

    async def send(self, client: httpx.AsyncClient, n: int) -> None:
        if self.finished.is_set():
            return
        mine = self.owned.setdefault(id(client), [])
        headers: dict[str, str] = {}
        started = time.perf_counter()
        if n % 5 == 0 or (n % 5 == 1 and not mine):
            kind = "POST"
            body = {
                "name": f"deploy-{self.run_id}-{n}",
                "description": f"created by request {n}",
                "price_cents": n,
            }
            request = client.post("/items", json=body)
        elif n % 5 == 1:
            kind, item_id = "PATCH", mine[n % len(mine)]
            body = {"description": f"changed by request {n}", "price_cents": n}
            headers["If-Match"] = f'"{self.acknowledged[item_id]["version"]}"'
            request = client.patch(f"/items/{item_id}", json=body, headers=headers)
        else:
            kind = "GET"
            request = client.get(f"/items/{self.ids[n % len(self.ids)]}")
        try:
            response = await request
        except httpx.TransportError as exc:
            self.answers.append(
                Answer(kind, started, time.perf_counter(), None, repr(exc), "-", "-")
            )
            return
        done = time.perf_counter()
        ok = 200 <= response.status_code < 300
        answer = response.json() if ok else {}
        self.answers.append(
            Answer(
                kind,
                started,
                done,
                response.status_code,
                "" if ok else response.text[:300],
                response.headers.get(SERVED_BY, "-"),
                "N+1" if "stock" in answer else "N",
            )
        )
        if ok and kind != "GET":
            state = {k: answer[k] for k in ("name", "description", "price_cents")}
            state["version"] = int(response.headers["ETag"].strip('"'))
            self.acknowledged[answer["id"]] = state
            self.writes[kind] += 1
            if kind == "POST":
                mine.append(answer["id"])
                self.ids.append(answer["id"])

    async def run(self) -> float:
        try:
            return await drive_load(
                self.base_url,
                MAX_REQUESTS,
                CONCURRENCY,
                self.send,
                request_timeout=REQUEST_TIMEOUT,
                timeout=LOAD_TIMEOUT,
            )
        finally:
            self.ended.set()

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Poll `condition()` in the event loop while the load runs; fail after
        STEP_TIMEOUT, or when the load ended first."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while not condition():
            assert not self.ended.is_set(), f"the load ended before {what}"
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {STEP_TIMEOUT}s: {what}")
            await asyncio.sleep(0.01)

    def failures(self) -> list[Answer]:
        return [a for a in self.answers if a.status is None or not 200 <= a.status < 300]

    def p99_by_phase(self) -> str:
        by_phase: dict[str, list[float]] = {name: [] for name, _ in self.marks}
        for answer in self.answers:
            by_phase[self.phase(answer.started)].append(answer.latency)
        return "; ".join(
            f"{name}: {len(values)} requests, p99 {p99(values) * 1000:.0f} ms"
            for name, values in by_phase.items()
        )

    def explain(self, failures: list[Answer], *logs: str) -> str:
        """The failures by phase, kind and answer, the first of them, and the log lines
        that say more (HAProxy's lines for answers other than 2xx, tracebacks)."""
        counts = Counter(
            (self.phase(a.started), a.kind, a.status or "transport error") for a in failures
        )
        first = "\n".join(
            f"  {self.phase(a.started)} {a.kind} -> {a.status} via {a.served_by}: {a.detail}"
            for a in failures[:5]
        )
        lines = [
            line
            for log in logs
            for line in log.splitlines()
            if "Traceback" in line or "Error" in line or NOT_2XX_LOG_LINE.match(line)
        ]
        return f"{len(failures)} failed requests {dict(counts)}:\n{first}\n" + "\n".join(lines[:30])


def p99(values: list[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[math.ceil(0.99 * len(ordered)) - 1]


def seed(base_url: str, count: int) -> list[int]:
    with httpx.Client(base_url=base_url, timeout=10) as client:
        ids = []
        for n in range(count):
            created = client.post("/items", json={"name": f"seed-{n}", "price_cents": n})
            assert created.status_code == 201, created.text
            ids.append(created.json()["id"])
    return ids


def ready(service: Service) -> bool:
    """The instance's readiness endpoint answers 200."""
    try:
        return httpx.get(f"{service.base_url}/health/db", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def start_instance(root: Path, log_path: Path, database_url: str) -> Service:
    service = Service(root, log_path, DATABASE_URL=database_url)
    service.start()
    wait_until(lambda: ready(service), READY_TIMEOUT, f"{log_path.stem} ready on /health/db")
    return service


@dataclass
class Deploy:
    """What the rolling deploy did, for the checks and figures."""

    migration_output: str = ""
    drained_in: dict[str, float] = field(default_factory=dict)
    back_in: dict[str, float] = field(default_factory=dict)
    migrated_at: float = 0.0
    replaced_at: float = 0.0


async def rolling_deploy(
    load: Load,
    project: Path,
    database_url: str,
    balancer: HAProxy,
    instances: dict[str, Service],
    changes: Changes,
    tmp_path: Path,
) -> Deploy:
    """Migrate to release N+1's schema, then replace each instance with release N+1's code:
    drained in HAProxy, stopped (SIGTERM), a new one started and put back once ready."""
    deploy = Deploy()
    try:
        await load.until(lambda: len(load.answers) >= BEFORE_ANSWERS, "the load got going")
        head = await asyncio.to_thread(head_revision, project)
        revision = project / "migrations" / "versions" / f"20991201_{NEXT_REVISION}_expand.py"
        changes.write(revision, EXPAND.format(revision=NEXT_REVISION, head=head))

        load.mark("migration")
        deploy.migration_output = await asyncio.to_thread(migrate, project, database_url)
        deploy.migrated_at = load.mark("old code, new schema")
        await load.until(
            lambda: len(load.since(deploy.migrated_at)) >= OLD_CODE_NEW_SCHEMA_ANSWERS,
            "release N served on the new schema",
        )

        # Release N+1's code; the running processes keep the code they imported.
        package = project / "src" / "my_service"
        changes.write(package / "models" / "item.py", NEXT_MODEL, append=True)
        changes.write(package / "schemas" / "item.py", NEXT_SCHEMA, append=True)
        load.mark("replacement")
        for slot in SLOTS:
            deploy.drained_in[slot] = await asyncio.to_thread(balancer.drain, slot)
            await asyncio.to_thread(instances[slot].stop)
            instances[slot] = await asyncio.to_thread(
                start_instance, project, tmp_path / f"{slot}-next.log", database_url
            )
            deploy.back_in[slot] = await asyncio.to_thread(
                balancer.replace, slot, instances[slot].port
            )
        deploy.replaced_at = load.mark("after")
        await load.until(
            lambda: len(load.since(deploy.replaced_at)) >= AFTER_ANSWERS,
            "release N+1 served on both instances",
        )
    finally:
        load.finished.set()
    return deploy


async def deploy_under_load(
    load: Load,
    project: Path,
    database_url: str,
    balancer: HAProxy,
    instances: dict[str, Service],
    changes: Changes,
    tmp_path: Path,
) -> tuple[Deploy, float]:
    load.mark("before")
    elapsed, deploy = await asyncio.gather(
        load.run(),
        rolling_deploy(load, project, database_url, balancer, instances, changes, tmp_path),
    )
    return deploy, elapsed


@pytest.mark.slow
def test_rolling_deploy_under_load_loses_nothing(
    project: Path, database: str, tmp_path: Path, record_property: Callable[[str, Any], None]
) -> None:
    changes = Changes()
    instances: dict[str, Service] = {}
    try:
        for slot in SLOTS:
            instances[slot] = start_instance(project, tmp_path / f"{slot}.log", database)
        with HAProxy(
            {slot: service.port for slot, service in instances.items()}, check_path="/health/db"
        ) as balancer:
            for slot in SLOTS:
                balancer.wait_up(slot)
            load = Load(balancer.base_url, seed(balancer.base_url, SEED_ITEMS))
            deploy, elapsed = asyncio.run(
                deploy_under_load(load, project, database, balancer, instances, changes, tmp_path)
            )
            balancer_log = balancer.log()
        # Whether the owner's model matches the revisions (what `alembic check` says in CI).
        check = subprocess.run(
            [*UV_RUN, "alembic", "check"],
            cwd=project,
            env=clean_env(DATABASE_URL=database),
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT,
        )
    finally:
        for service in instances.values():
            service.stop()
        changes.restore()
    logs = sorted(tmp_path.glob("*.log"))
    service_logs = "\n".join(path.read_text(errors="replace") for path in logs)

    with psycopg.connect(database, connect_timeout=5) as conn:
        # Each row as a dict of its columns, whichever columns the table has.
        rows: dict[int, dict[str, Any]] = {
            row["id"]: row for (row,) in conn.execute("SELECT to_jsonb(items) FROM items")
        }
        version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        index_valid = conn.execute(
            "SELECT indisvalid FROM pg_index JOIN pg_class ON pg_class.oid = indexrelid "
            "WHERE relname = 'ix_items_price_cents'"
        ).fetchall()

    answers = load.answers
    failures = load.failures()
    old_on_new = [a for a in load.since(deploy.migrated_at) if a.release == "N"]
    new_code = [a for a in answers if a.release == "N+1"]
    figures = (
        f"{len(answers)} requests over {CONCURRENCY} connections through HAProxy in "
        f"{elapsed:.1f}s, {len(failures)} failed; acknowledged writes: "
        f"{load.writes['POST']} POST, {load.writes['PATCH']} PATCH "
        f"({len(load.acknowledged)} items checked); answered by release N after the "
        f"migration: {len(old_on_new)}, by release N+1: {len(new_code)}; "
        f"{load.p99_by_phase()}; drained in "
        f"{', '.join(f'{s} {t * 1000:.0f} ms' for s, t in deploy.drained_in.items())}; "
        f"back in rotation after "
        f"{', '.join(f'{s} {t * 1000:.0f} ms' for s, t in deploy.back_in.items())}"
    )
    report(record_property, "rolling deploy", figures)

    assert f"-> {NEXT_REVISION}" in deploy.migration_output, deploy.migration_output
    assert not failures, f"{figures}\n{load.explain(failures, balancer_log, service_logs)}"
    assert "Traceback" not in service_logs, load.explain([], service_logs)
    # The load ran through every step of the deploy.
    phases = Counter(load.phase(answer.started) for answer in answers)
    assert all(phases[name] > 0 for name, _ in load.marks), f"{dict(phases)}; {figures}"
    # Release N's code served on release N+1's schema, then release N+1 on both slots.
    assert len(old_on_new) >= OLD_CODE_NEW_SCHEMA_ANSWERS, figures
    assert {a.served_by for a in new_code} == set(SLOTS), figures
    assert all(a.release == "N+1" for a in load.since(deploy.replaced_at)), figures

    # Every acknowledged write is stored as it was answered.
    for item_id, state in load.acknowledged.items():
        assert item_id in rows, f"item {item_id} acknowledged but lost: {state}; {figures}"
        stored = {key: rows[item_id].get(key) for key in state}
        assert stored == state, f"item {item_id}: stored {stored}, acknowledged {state}"
    # The expand step: both names of the column agree on every row, whichever release wrote
    # it or the backfill did; the new column has its default; the index is usable.
    apart = [row for row in rows.values() if row.get("details") != row.get("description")]
    assert not apart, f"description and details differ: {apart[:5]}"
    assert {row.get("stock") for row in rows.values()} == {0}
    assert version == [(NEXT_REVISION,)]
    assert index_valid == [(True,)]
    assert check.returncode == 0, check.stdout + check.stderr


@pytest.mark.slow
def test_migration_behind_a_long_transaction_gives_up_and_requests_go_on(
    project: Path, database: str, tmp_path: Path, record_property: Callable[[str, Any], None]
) -> None:
    head = head_revision(project)
    changes = Changes()
    changes.write(
        project / "migrations" / "versions" / "20991202_0901_add_colour.py",
        ALTER_ITEMS.format(head=head),
    )
    try:
        with (
            running_service(project, tmp_path / "uvicorn.log", DATABASE_URL=database) as service,
            psycopg.connect(database, connect_timeout=5) as blocker,
        ):
            load = Load(service.base_url, seed(service.base_url, SEED_ITEMS))
            # A transaction that read the table and stays open: its lock outlives the
            # migration's lock timeout.
            blocker.execute("SELECT count(*) FROM items").fetchone()
            timeline, output, returncode, elapsed = asyncio.run(
                migrate_behind(load, project, database)
            )
            blocker.rollback()
            log = service.log()
    finally:
        changes.restore()

    with psycopg.connect(database, connect_timeout=5) as conn:
        version = conn.execute("SELECT version_num FROM alembic_version").fetchall()
        colour = conn.execute(
            "SELECT 1 FROM information_schema.columns "
            "WHERE table_name = 'items' AND column_name = 'colour'"
        ).fetchall()

    waiting_at, gave_up_at = timeline
    # In progress while the migration was seen waiting, or started then.
    queued = [a for a in load.answers if a.started <= gave_up_at and a.done >= waiting_at]
    failures = load.failures()
    worst = max((a.latency for a in queued), default=math.nan)
    figures = (
        f"{len(load.answers)} requests in {elapsed:.1f}s, {len(failures)} failed; the "
        f"migration waited {gave_up_at - waiting_at:.2f}s after it was seen waiting, with "
        f"DB_MIGRATION_LOCK_TIMEOUT={LOCK_TIMEOUT_SECONDS}; {len(queued)} requests in progress "
        f"meanwhile, the slowest answered in {worst * 1000:.0f} ms; {load.p99_by_phase()}"
    )
    report(record_property, "lock timeout", figures)

    assert returncode != 0, output
    assert "DB_MIGRATION_LOCK_TIMEOUT" in output, output
    assert "Traceback" not in output, output
    # Nothing changed.
    assert version == [(head,)]
    assert colour == []
    assert not failures, f"{figures}\n{load.explain(failures, log)}"
    assert "Traceback" not in log, log[-4000:]
    assert queued, f"no request ran while the migration waited: {figures}"
    late = [a for a in queued if a.done > gave_up_at + QUEUED_ANSWER_BOUND]
    assert not late, f"requests still waiting {QUEUED_ANSWER_BOUND}s after it gave up: {figures}"


def wait_for_lock_wait(database_url: str, process: subprocess.Popen[str]) -> None:
    """Until a session waits for the table lock that ADD COLUMN needs on items (pg_locks),
    or the migration has exited."""
    with psycopg.connect(database_url, autocommit=True, connect_timeout=5) as conn:

        def waiting() -> bool:
            row = conn.execute(
                "SELECT count(*) FROM pg_locks WHERE relation = 'items'::regclass "
                "AND mode = 'AccessExclusiveLock' AND NOT granted"
            ).fetchone()
            return process.poll() is not None or (row is not None and row[0] > 0)

        wait_until(waiting, STEP_TIMEOUT, "the migration waits for the items table", 0.01)


async def migrate_behind(
    load: Load, project: Path, database_url: str
) -> tuple[tuple[float, float], str, int, float]:
    """Under load, `alembic upgrade head` with DB_MIGRATION_LOCK_TIMEOUT: the moments it was
    seen waiting for the table and it returned, its output and exit code, the load's time."""
    load.mark("before")
    timeline: list[float] = []
    result: list[Any] = []

    async def migration() -> None:
        try:
            await load.until(lambda: len(load.answers) >= BEFORE_ANSWERS, "the load got going")
            process = subprocess.Popen(
                [*UV_RUN, "alembic", "upgrade", "head"],
                cwd=project,
                env=clean_env(
                    DATABASE_URL=database_url,
                    DB_MIGRATION_LOCK_TIMEOUT=str(LOCK_TIMEOUT_SECONDS),
                ),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            try:
                await asyncio.to_thread(wait_for_lock_wait, database_url, process)
                timeline.append(load.mark("lock wait"))
                output, _ = await asyncio.to_thread(process.communicate, timeout=STEP_TIMEOUT)
            finally:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            timeline.append(load.mark("after"))
            result.extend([output, process.returncode])
            await load.until(
                lambda: len(load.since(timeline[1])) >= AFTER_ANSWERS, "requests after it"
            )
        finally:
            load.finished.set()

    elapsed, _ = await asyncio.gather(load.run(), migration())
    return (timeline[0], timeline[1]), result[0], result[1], elapsed
