"""The read replica against a real streaming standby: a rendered read_replica=true service
under uvicorn, its DATABASE_URL on a primary (the runtime role of migrations/runtime_role.sql)
and its DATABASE_READ_URL on a hot standby of it made with pg_basebackup -R (the read role of
migrations/replica_role.sql, made on the primary and replayed to the standby).

Each behaviour is a test of its own: the roles replayed to the standby; the read role cannot
write on the primary even after turning read-only transactions off, nor anywhere on the
standby; a setting one read session changed is reset before the next read session gets the
same pooled connection (tests/programs/replica_reset_probe.py, the service's own Database);
writes go to the primary and reads to the standby; with the standby stopped, reads answer
503 with Retry-After, writes go on, /health/db says "degraded" and /metrics counts the
replica's connection failures apart from the primary's; with the standby started again the
service reads from it again, what was written meanwhile included; with the primary stopped
/health/db answers 503.

The module's tests share one primary and standby, one rendered project and one service
(module-scoped fixtures, one pytest-xdist worker). A test that stops a server starts it
again before it ends, so the tests pass in any order; every wait is bounded in time.
"""

from __future__ import annotations

import json
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from harness.rendering import clean_env
from harness.replication import Standby, primary_and_standby, wait_replayed
from harness.services import (
    UV_RUN,
    RestartableCluster,
    Service,
    copy_program,
    migrate,
    render_synced,
    report,
    run,
    running_service,
    wait_until,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("replica")]

DATABASE = "replica_test"
OWNER = "owner"  # the schema owner: runs the migrations and the role scripts
RUNTIME_ROLE = "app"  # migrations/runtime_role.sql: DATABASE_URL
READ_ROLE = "app_read"  # migrations/replica_role.sql: DATABASE_READ_URL
APPLICATION_NAME = "my_service"  # the service's connections (db/driver.py)
REQUEST_TIMEOUT = 10.0
# From "a server accepts connections again" to /health/db "ok".
RECOVERY_TIMEOUT = 15.0
# A standby whose primary was restarted streams again within its wal_retrieve_retry_interval.
REPLAY_AFTER_RESTART_TIMEOUT = 30.0
PROBE_TIMEOUT = 60.0
INSUFFICIENT_PRIVILEGE = "42501"
READ_ONLY_SQL_TRANSACTION = "25006"
WRITES = [
    "INSERT INTO items (name, price_cents) VALUES ('by the read role', 1)",
    "UPDATE items SET price_cents = 2",
    "DELETE FROM items",
    "CREATE TABLE by_the_read_role (x int)",
    "CREATE TEMPORARY TABLE by_the_read_role (x int)",
]


def role_url(cluster: RestartableCluster, user: str, password: str) -> str:
    """The URL of DATABASE on `cluster`, as `user`."""
    credentials = f"{quote(user, safe='')}:{quote(password, safe='')}"
    return f"postgresql://{credentials}@127.0.0.1:{cluster.port}/{DATABASE}"


def role_statements(
    conn: psycopg.Connection[Any], script: Path, role: str, password: str
) -> list[str]:
    """The statements of a psql script of migrations/ with its variables (:"role",
    :'password', :"DBNAME") filled in, quoted as psql would, one statement each."""
    lines = script.read_text().splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("--"))
    for variable, value in (
        (':"role"', sql.Identifier(role)),
        (":'password'", sql.Literal(password)),
        (':"DBNAME"', sql.Identifier(DATABASE)),
    ):
        text = text.replace(variable, value.as_string(conn))
    assert ":'" not in text, f"a psql variable left unfilled:\n{text}"
    assert ':"' not in text, f"a psql variable left unfilled:\n{text}"
    statements = [statement.strip() for statement in text.split(";") if statement.strip()]
    assert statements, f"no statement in {script}"
    return statements


@dataclass
class Replicated:
    """The rendered project, its database migrated on the primary and replayed to the
    standby, and the URLs of its three roles."""

    project: Path
    primary: RestartableCluster
    standby: Standby
    passwords: dict[str, str]

    def url(self, cluster: RestartableCluster, role: str) -> str:
        return role_url(cluster, role, self.passwords[role])

    @property
    def owner_url(self) -> str:
        return self.url(self.primary, OWNER)

    @property
    def database_url(self) -> str:
        return self.url(self.primary, RUNTIME_ROLE)

    @property
    def read_url(self) -> str:
        return self.url(self.standby, READ_ROLE)

    def replayed(self, timeout: float = REPLAY_AFTER_RESTART_TIMEOUT) -> None:
        wait_replayed(self.primary.url, self.standby.url, timeout)


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicated]:
    """A primary and its hot standby, with the database owned by a schema owner that
    migrates it and makes the service's two roles with the rendered scripts."""
    project = render_synced(tmp_path_factory.mktemp("replica") / "service", read_replica=True)
    passwords = {role: secrets.token_hex(12) for role in (OWNER, RUNTIME_ROLE, READ_ROLE)}
    with primary_and_standby(password=secrets.token_hex(12)) as (primary, standby):
        with psycopg.connect(primary.url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(
                sql.SQL("CREATE ROLE {} LOGIN CREATEROLE PASSWORD {}").format(
                    sql.Identifier(OWNER), sql.Literal(passwords[OWNER])
                )
            )
            conn.execute(
                sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(DATABASE), sql.Identifier(OWNER)
                )
            )
        replicated = Replicated(project, primary, standby, passwords)
        migrate(project, replicated.owner_url)
        with psycopg.connect(replicated.owner_url, autocommit=True, connect_timeout=5) as conn:
            for script, role in (
                ("runtime_role.sql", RUNTIME_ROLE),
                ("replica_role.sql", READ_ROLE),
            ):
                script_path = project / "migrations" / script
                for statement in role_statements(conn, script_path, role, passwords[role]):
                    conn.execute(statement)
        replicated.replayed()
        yield replicated


@pytest.fixture(scope="module")
def service(replicated: Replicated, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service under uvicorn: writes on the primary, reads on the standby."""
    with running_service(
        replicated.project,
        tmp_path_factory.mktemp("replica-service") / "service.log",
        DATABASE_URL=replicated.database_url,
        DATABASE_READ_URL=replicated.read_url,
        DATABASE_MIGRATION_URL=replicated.owner_url,
    ) as service:
        yield service


@pytest.fixture
def client(service: Service) -> Iterator[httpx.Client]:
    """A client of the service; after the test, the service's log holds no traceback."""
    logged_before = len(service.log())
    with httpx.Client(base_url=service.base_url, timeout=REQUEST_TIMEOUT) as client:
        yield client
    log = service.log()[logged_before:]
    assert "Traceback" not in log, log[log.index("Traceback") :][:3000]


def one(url: str, query: str, *params: Any) -> Any:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def service_connections(url: str, role: str, since: datetime | None = None) -> int:
    """Client connections of the service (application_name) as `role` to DATABASE on the
    server of `url`; with `since`, only those whose state changed after it (a statement
    began or ended)."""
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND usename = %s "
        "AND application_name = %s AND backend_type = 'client backend' "
        "AND (%s::timestamptz IS NULL OR state_change > %s::timestamptz)"
    )
    return int(one(url, query, DATABASE, role, APPLICATION_NAME, since, since))


def engine_metrics(client: httpx.Client) -> dict[tuple[str, str], float]:
    """GET /metrics: the value of every sample with an `engine` label, by sample name and
    engine."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return {
        (sample.name, sample.labels["engine"]): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if "engine" in sample.labels
    }


def sqlstate_of(conn: psycopg.Connection[Any], statement: str) -> str | None:
    """Run `statement` (autocommit): None when it succeeds, else its SQLSTATE."""
    try:
        conn.execute(statement)
    except psycopg.Error as exc:
        return exc.sqlstate
    return None


def new_item(tag: str) -> dict[str, Any]:
    return {"name": f"replica-{tag}-{uuid.uuid4().hex[:8]}", "description": tag, "price_cents": 1}


def create(client: httpx.Client, tag: str) -> dict[str, Any]:
    """POST /items: the item as the service answered it."""
    sent = new_item(tag)
    created = client.post("/items", json=sent)
    assert created.status_code == 201, created.text
    item: dict[str, Any] = created.json()
    assert {k: item[k] for k in sent} == sent, item
    return item


def health_is_ok(client: httpx.Client) -> bool:
    answer = client.get("/health/db")
    return answer.status_code == 200 and answer.json()["status"] == "ok"


def test_the_standby_is_in_recovery_with_the_roles_replayed(replicated: Replicated) -> None:
    with psycopg.connect(replicated.read_url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute("SELECT pg_is_in_recovery(), current_user").fetchone()
    assert row == (True, READ_ROLE), row
    assert one(replicated.database_url, "SELECT pg_is_in_recovery()") is False


def test_the_read_role_cannot_write_on_the_primary_even_with_read_only_off(
    replicated: Replicated,
) -> None:
    with psycopg.connect(
        replicated.url(replicated.primary, READ_ROLE), autocommit=True, connect_timeout=5
    ) as conn:
        row = conn.execute("SHOW default_transaction_read_only").fetchone()
        assert row == ("on",), f"the read role's own setting: {row}"
        conn.execute("SET default_transaction_read_only = off")
        row = conn.execute("SHOW transaction_read_only").fetchone()
        assert row == ("off",), row
        # No grant: refused for want of privilege, not for the read-only transaction.
        assert sqlstate_of(conn, WRITES[0]) == INSUFFICIENT_PRIVILEGE
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
            conn.execute(WRITES[0])
        assert sqlstate_of(conn, "SELECT count(*) FROM items") is None


def test_nothing_writes_on_the_standby(
    replicated: Replicated, record_property: Callable[[str, Any], None]
) -> None:
    with psycopg.connect(replicated.read_url, autocommit=True, connect_timeout=5) as conn:
        refused = {statement: sqlstate_of(conn, statement) for statement in WRITES}
        accepts_off = sqlstate_of(conn, "SET default_transaction_read_only = off") is None
        refused_after_off = {statement: sqlstate_of(conn, statement) for statement in WRITES}
        assert sqlstate_of(conn, "SELECT count(*) FROM items") is None
    answer = "yes" if accepts_off else "no"
    report(record_property, "replica", f"standby accepts read-only off: {answer}")
    assert set(refused.values()) == {READ_ONLY_SQL_TRANSACTION}, refused
    assert set(refused_after_off.values()) == {READ_ONLY_SQL_TRANSACTION}, refused_after_off


def test_a_setting_changed_by_a_read_session_is_reset_for_the_next(
    replicated: Replicated, record_property: Callable[[str, Any], None]
) -> None:
    # The service's own Database, one pooled replica connection, a setting changed in one
    # read session and read again in the next.
    probe = copy_program("replica_reset_probe.py", replicated.project / "replica_reset_probe.py")
    output = run(
        [*UV_RUN, "python", str(probe)],
        replicated.project,
        clean_env(
            DATABASE_URL=replicated.database_url,
            DATABASE_READ_URL=replicated.read_url,
            DB_POOL_SIZE="1",
            DB_MAX_OVERFLOW="0",
        ),
        timeout=PROBE_TIMEOUT,
    )
    printed = output[output.index("RESULT ") + len("RESULT ") :].splitlines()[0]
    report(record_property, "replica reset probe", printed)
    result = json.loads(printed)
    assert result["in_recovery"] is True, result
    assert result["pool"]["size"] == 1, result
    changes = result["changes"]
    connection_values = {
        "default_transaction_read_only": ("on", "off"),
        "application_name": (APPLICATION_NAME, "changed"),
        # DB_STATEMENT_TIMEOUT's default, sent when the connection is made.
        "statement_timeout": ("30s", "5min"),
    }
    assert set(changes) == set(connection_values), changes
    # Every setting is checked and reported, whichever fails first.
    problems = []
    for setting, (own, changed) in connection_values.items():
        change = changes[setting]
        # The standby accepts each of these SETs (a hot standby refuses read-write
        # transactions, not the setting), so every reset is checked.
        if change["set_error"] is not None:
            problems.append(f"{setting}: the standby refused the SET: {change}")
        elif change["pid"] != change["next_pid"]:
            problems.append(f"{setting}: not one pooled connection: {change}")
        elif (change["before"], change["in_session"]) != (own, changed):
            problems.append(f"{setting}: not {own!r} then {changed!r}: {change}")
        elif change["next_session"] != own:
            problems.append(f"{setting} changed by one read session reached the next: {change}")
    assert not problems, "\n".join(problems)


def test_writes_go_to_the_primary_and_reads_to_the_standby(
    replicated: Replicated, client: httpx.Client
) -> None:
    primary, standby = replicated.primary, replicated.standby
    item = create(client, "routed")
    replicated.replayed()
    # The standby's clock (the same host's): the service's read changes a connection's
    # state there after it.
    before_read = one(standby.url, "SELECT clock_timestamp()")
    read = client.get(f"/items/{item['id']}")
    assert read.status_code == 200, read.text
    assert read.json() == item
    assert service_connections(standby.url, READ_ROLE, since=before_read) >= 1, (
        "the read did not come from the standby"
    )
    assert service_connections(primary.url, READ_ROLE) == 0
    assert service_connections(primary.url, RUNTIME_ROLE) >= 1
    assert service_connections(standby.url, RUNTIME_ROLE) == 0
    health = client.get("/health/db")
    assert health.status_code == 200, health.text
    assert health.json()["status"] == "ok", health.text
    assert health.json()["replica"]["status"] == "ok", health.text


def test_with_the_standby_down_reads_answer_503_and_writes_go_on(
    replicated: Replicated, client: httpx.Client, record_property: Callable[[str, Any], None]
) -> None:
    item = create(client, "before-outage")
    replicated.replayed()
    before = engine_metrics(client)
    replicated.standby.stop_server()
    try:
        outage_read = client.get(f"/items/{item['id']}")
        assert outage_read.status_code == 503, outage_read.text
        assert "Retry-After" in outage_read.headers, dict(outage_read.headers)
        create(client, "outage")
        health = client.get("/health/db")
        body = health.json()
        assert health.status_code == 200, health.text
        assert body["status"] == "degraded", body
        assert body["replica"]["status"] == "unavailable", body
        # The top level is the primary's report: it answered.
        assert "error" not in body, body
        after = engine_metrics(client)
    finally:
        replicated.standby.start_server(wait=True)
        wait_until(lambda: health_is_ok(client), RECOVERY_TIMEOUT, "/health/db is ok again")
    failures = {
        engine: after[("db_connection_failures_total", engine)]
        - before[("db_connection_failures_total", engine)]
        for engine in ("primary", "replica")
    }
    report(record_property, "replica outage", f"connection failures counted: {failures}")
    assert failures["replica"] >= 1, failures
    assert failures["primary"] == 0, failures
    assert ("db_pool_size", "primary") in after, after
    assert ("db_pool_size", "replica") in after, after


def test_reads_come_from_the_standby_again_once_it_is_started(
    replicated: Replicated, client: httpx.Client, record_property: Callable[[str, Any], None]
) -> None:
    item = create(client, "before-restart")
    replicated.standby.stop_server()
    try:
        written = create(client, "while-stopped")
    finally:
        replicated.standby.start_server(wait=True)
    ready_again = wait_until(
        lambda: health_is_ok(client), RECOVERY_TIMEOUT, "/health/db is ok again"
    )
    report(
        record_property,
        "replica restart",
        f"/health/db ok {ready_again:.2f}s after the standby accepted connections",
    )
    # What was written while it was down reaches it, and is read from it.
    replicated.replayed()
    before_read = one(replicated.standby.url, "SELECT clock_timestamp()")
    for expected in (item, written):
        again = client.get(f"/items/{expected['id']}")
        assert again.status_code == 200, again.text
        assert again.json() == expected
    assert service_connections(replicated.standby.url, READ_ROLE, since=before_read) >= 1


def test_with_the_primary_down_the_service_is_not_ready(
    replicated: Replicated, client: httpx.Client
) -> None:
    replicated.primary.stop_server()
    try:
        health = client.get("/health/db")
    finally:
        replicated.primary.start_server(wait=True)
        wait_until(lambda: health_is_ok(client), RECOVERY_TIMEOUT, "/health/db is ok again")
        replicated.replayed()
    assert health.status_code == 503, health.text
    body = health.json()
    assert body["status"] == "unavailable", body
    # The standby still answers; only the primary is down.
    assert body["replica"]["status"] == "ok", body
