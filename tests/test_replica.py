"""The read replica against a real streaming standby: a rendered read_replica=true service
under uvicorn, its DATABASE_URL on a primary (the runtime role of migrations/runtime_role.sql)
and its DATABASE_READ_URL on a hot standby of it made with pg_basebackup -R (the read role of
migrations/replica_role.sql, made on the primary and replayed to the standby).

What it shows: reads are served by the standby (its pg_stat_activity holds the service's
connections); with the standby stopped, reads answer 503 with Retry-After, writes go on,
/health/db says "degraded" and /metrics counts the replica's connection failures apart from
the primary's; with the standby started again the service reads from it again within a
bounded wait; with the primary stopped /health/db answers 503. The read role cannot write
on the primary even after turning read-only transactions off, nor anywhere on the standby.
A setting one read session changed is reset before the next read session gets the same
pooled connection (tests/programs/replica_reset_probe.py, the service's own Database).

The test has a primary and a standby of its own; every wait is bounded in count and time.
"""

from __future__ import annotations

import json
import secrets
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import sql

from harness.rendering import clean_env
from harness.replication import primary_and_standby, wait_replayed
from harness.services import (
    UV_RUN,
    RestartableCluster,
    copy_program,
    migrate,
    render_synced,
    report,
    run,
    running_service,
    wait_until,
)

DATABASE = "replica_test"
OWNER = "owner"  # the schema owner: runs the migrations and the role scripts
RUNTIME_ROLE = "app"  # migrations/runtime_role.sql: DATABASE_URL
READ_ROLE = "app_read"  # migrations/replica_role.sql: DATABASE_READ_URL
APPLICATION_NAME = "my_service"  # the service's connections (db/driver.py)
REQUEST_TIMEOUT = 10.0
# From "the standby accepts connections again" to /health/db "ok" and a read answered.
RECOVERY_TIMEOUT = 15.0
PROBE_TIMEOUT = 60.0
INSUFFICIENT_PRIVILEGE = "42501"
READ_ONLY_SQL_TRANSACTION = "25006"


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


def service_connections(url: str, role: str) -> int:
    """Client connections of the service (application_name) as `role` to DATABASE on the
    server of `url`."""
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND usename = %s "
            "AND application_name = %s AND backend_type = 'client backend'",
            (DATABASE, role, APPLICATION_NAME),
        ).fetchone()
    assert row is not None
    return int(row[0])


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


@pytest.mark.slow
def test_reads_from_a_streaming_standby(
    tmp_path: Path, record_property: Callable[[str, Any], None]
) -> None:
    started = time.monotonic()
    project = render_synced(tmp_path / "service", read_replica=True)
    probe = copy_program("replica_reset_probe.py", project / "replica_reset_probe.py")
    passwords = {role: secrets.token_hex(12) for role in (OWNER, RUNTIME_ROLE, READ_ROLE)}
    figures: list[str] = []

    with primary_and_standby(password=secrets.token_hex(12)) as (primary, standby):
        figures.append(f"standby made in {standby.creation_seconds:.1f}s")
        # The database on the primary, owned by a schema owner that migrates it and makes
        # the service's two roles with the rendered scripts; the standby replays all of it.
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
        owner_url = role_url(primary, OWNER, passwords[OWNER])
        migrate(project, owner_url)
        with psycopg.connect(owner_url, autocommit=True, connect_timeout=5) as conn:
            for script, role in (
                ("runtime_role.sql", RUNTIME_ROLE),
                ("replica_role.sql", READ_ROLE),
            ):
                script_path = project / "migrations" / script
                for statement in role_statements(conn, script_path, role, passwords[role]):
                    conn.execute(statement)
        wait_replayed(primary.url, standby.url)
        database_url = role_url(primary, RUNTIME_ROLE, passwords[RUNTIME_ROLE])
        read_url = role_url(standby, READ_ROLE, passwords[READ_ROLE])
        # The roles exist on the standby, and it is a standby.
        with psycopg.connect(read_url, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SELECT pg_is_in_recovery(), current_user").fetchone()
            assert row == (True, READ_ROLE), row

        # The read role: on the primary, turning read-only transactions off does not let
        # it write (no grant); on the standby, nothing writes.
        read_on_primary = role_url(primary, READ_ROLE, passwords[READ_ROLE])
        insert = "INSERT INTO items (name, price_cents) VALUES ('by the read role', 1)"
        with psycopg.connect(read_on_primary, autocommit=True, connect_timeout=5) as conn:
            row = conn.execute("SHOW default_transaction_read_only").fetchone()
            assert row == ("on",), f"the read role's own setting: {row}"
            conn.execute("SET default_transaction_read_only = off")
            row = conn.execute("SHOW transaction_read_only").fetchone()
            assert row == ("off",), row
            assert sqlstate_of(conn, insert) == INSUFFICIENT_PRIVILEGE
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="permission denied"):
                conn.execute(insert)
            assert sqlstate_of(conn, "SELECT count(*) FROM items") is None
        writes = [
            insert,
            "UPDATE items SET price_cents = 2",
            "DELETE FROM items",
            "CREATE TABLE by_the_read_role (x int)",
            "CREATE TEMPORARY TABLE by_the_read_role (x int)",
        ]
        with psycopg.connect(read_url, autocommit=True, connect_timeout=5) as conn:
            refused = {statement: sqlstate_of(conn, statement) for statement in writes}
            standby_accepts_off = (
                sqlstate_of(conn, "SET default_transaction_read_only = off") is None
            )
            refused_after_off = {statement: sqlstate_of(conn, statement) for statement in writes}
            assert sqlstate_of(conn, "SELECT count(*) FROM items") is None
        assert set(refused.values()) == {READ_ONLY_SQL_TRANSACTION}, refused
        assert set(refused_after_off.values()) == {READ_ONLY_SQL_TRANSACTION}, refused_after_off
        figures.append(
            "standby accepts SET default_transaction_read_only = off: "
            f"{'yes' if standby_accepts_off else 'no'}"
        )

        # A read connection is reset when it returns to the pool: the service's own
        # Database, one pooled replica connection, a setting changed in one read session.
        output = run(
            [*UV_RUN, "python", str(probe)],
            project,
            clean_env(
                DATABASE_URL=database_url,
                DATABASE_READ_URL=read_url,
                DB_POOL_SIZE="1",
                DB_MAX_OVERFLOW="0",
            ),
            timeout=PROBE_TIMEOUT,
        )
        printed = output[output.index("RESULT ") + len("RESULT ") :].splitlines()[0]
        result = json.loads(printed)
        figures.append(f"reset probe: {printed}")
        assert result["in_recovery"] is True, result
        assert result["pool"]["size"] == 1, result
        changes = result["changes"]
        connection_values = {
            "default_transaction_read_only": ("on", "off"),
            "application_name": (APPLICATION_NAME, "changed"),
            # DB_STATEMENT_TIMEOUT's default, sent when the connection is made.
            "statement_timeout": ("30s", "5min"),
        }
        for setting, (own, changed) in connection_values.items():
            change = changes[setting]
            assert change["pid"] == change["next_pid"], f"not one pooled connection: {change}"
            assert change["before"] == own, (setting, change)
            if change["set_error"] is None:
                assert change["in_session"] == changed, (setting, change)
                assert change["next_session"] == own, (
                    f"{setting} changed by one read session reached the next: {change}"
                )
        # The standby accepts every one of these SETs (a hot standby refuses read-write
        # transactions, not the setting), so every reset is checked.
        assert all(change["set_error"] is None for change in changes.values()), changes

        with (
            running_service(
                project,
                tmp_path / "service.log",
                DATABASE_URL=database_url,
                DATABASE_READ_URL=read_url,
                DATABASE_MIGRATION_URL=owner_url,
            ) as service,
            httpx.Client(base_url=service.base_url, timeout=REQUEST_TIMEOUT) as client,
        ):
            # Writes go to the primary, reads to the standby. None of the service's
            # connections is there yet (the probe's, if any, close as it exits).
            wait_until(
                lambda: service_connections(standby.url, READ_ROLE) == 0,
                5,
                "no connection of the service on the standby before the first read",
            )
            sent = new_item("routed")
            created = client.post("/items", json=sent)
            assert created.status_code == 201, created.text
            item = created.json()
            assert {k: item[k] for k in sent} == sent, item
            path = f"/items/{item['id']}"
            wait_replayed(primary.url, standby.url)
            read = client.get(path)
            assert read.status_code == 200, read.text
            assert read.json() == item
            on_standby = service_connections(standby.url, READ_ROLE)
            assert on_standby >= 1, "the read did not come from the standby"
            assert service_connections(primary.url, READ_ROLE) == 0
            assert service_connections(primary.url, RUNTIME_ROLE) >= 1
            health = client.get("/health/db")
            assert health.status_code == 200, health.text
            assert health.json()["status"] == "ok", health.text
            assert health.json()["replica"]["status"] == "ok", health.text

            # The standby stops (fast shutdown): reads answer 503, writes go on.
            standby.stop_server()
            outage_read = client.get(path)
            assert outage_read.status_code == 503, outage_read.text
            assert "Retry-After" in outage_read.headers, dict(outage_read.headers)
            during_outage = new_item("outage")
            written = client.post("/items", json=during_outage)
            assert written.status_code == 201, written.text
            health = client.get("/health/db")
            body = health.json()
            assert health.status_code == 200, health.text
            assert body["status"] == "degraded", body
            assert body["replica"]["status"] == "unavailable", body
            # The top level is the primary's report: it answered.
            assert "error" not in body, body
            assert body["connection_failures"] == 0, body
            metrics = engine_metrics(client)
            assert metrics[("db_connection_failures_total", "replica")] >= 1, metrics
            assert metrics[("db_connection_failures_total", "primary")] == 0, metrics
            assert ("db_pool_size", "primary") in metrics, metrics
            assert ("db_pool_size", "replica") in metrics, metrics
            replica_failures = metrics[("db_connection_failures_total", "replica")]

            # The standby is back: the service reads from it again.
            standby.start_server(wait=True)

            def recovered() -> bool:
                answer = client.get("/health/db")
                return answer.status_code == 200 and answer.json()["status"] == "ok"

            ready_again = wait_until(recovered, RECOVERY_TIMEOUT, "/health/db is ok again")
            again = client.get(path)
            assert again.status_code == 200, again.text
            assert again.json() == item
            # What was written while it was down reaches it, and reads from it.
            wait_replayed(primary.url, standby.url)
            outage_item = client.get(f"/items/{written.json()['id']}")
            assert outage_item.status_code == 200, outage_item.text
            assert outage_item.json() == written.json()
            figures.append(
                f"standby outage: {int(replica_failures)} replica connection failures "
                f"counted; /health/db ok {ready_again:.2f}s after the standby accepted "
                "connections"
            )

            # The primary stops instead: the service is not ready.
            primary.stop_server()
            health = client.get("/health/db")
            assert health.status_code == 503, health.text
            assert health.json()["status"] == "unavailable", health.text
            figures.append(f"primary down: /health/db {health.status_code} {health.text}")
        log = service.log()
    assert "Traceback" not in log, log[log.index("Traceback") :][:3000]
    figures.append(f"{time.monotonic() - started:.1f}s in all")
    report(record_property, "replica", "; ".join(figures))
