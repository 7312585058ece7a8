"""The throwaway PostgreSQL cluster the suite falls back on really starts and goes away; a
hot standby made from a throwaway primary really replicates, refuses writes, stops and
starts again."""

from __future__ import annotations

import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import psycopg
import pytest

from harness import pgserver
from harness.replication import Standby, hot_standby, primary_and_standby, wait_replayed
from harness.services import RestartableCluster, report, throwaway_cluster, wait_accepting


def test_throwaway_cluster_starts_answers_and_is_removed() -> None:
    bindir = pgserver.find_bindir()
    if bindir is None:
        pytest.fail("PostgreSQL server binaries not found. " + pgserver.HOW_TO_PROVIDE)
    cluster = pgserver.ThrowawayCluster(bindir)
    try:
        url = cluster.start()
        assert pgserver.answers(url)
        out = subprocess.run(
            [str(bindir / "psql"), url, "-Atc", "SELECT 40 + 2"],
            capture_output=True,
            text=True,
            check=True,
        )
        assert out.stdout.strip() == "42"
    finally:
        cluster.stop()
    assert not cluster.root.exists()
    assert not pgserver.answers(url)


def test_provide_prefers_a_server_that_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = pgserver.ThrowawayCluster(pgserver.find_bindir() or pytest.fail("no binaries"))
    try:
        url = cluster.start()
        monkeypatch.setenv("TEST_DATABASE_URL", url)
        assert pgserver.provide() == (url, None)
    finally:
        cluster.stop()


def test_provide_starts_a_cluster_when_nothing_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "TEST_DATABASE_URL", f"postgresql://postgres@127.0.0.1:{pgserver.free_port()}/postgres"
    )
    url, cluster = pgserver.provide()
    try:
        assert cluster is not None
        assert pgserver.answers(url)
    finally:
        if cluster is not None:
            cluster.stop()


def test_no_server_and_no_binaries_is_a_clear_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "TEST_DATABASE_URL", f"postgresql://postgres@127.0.0.1:{pgserver.free_port()}/postgres"
    )
    monkeypatch.setattr(pgserver, "find_bindir", lambda: None)
    with pytest.raises(pgserver.NoServerError, match="TEST_DATABASE_URL"):
        pgserver.provide()


# -- a hot standby -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def replicated() -> Iterator[tuple[RestartableCluster, Standby]]:
    """A primary and its hot standby, shared by the module's tests (each leaves both
    running), with a table to write to."""
    with primary_and_standby() as (primary, standby):
        with psycopg.connect(primary.url, autocommit=True, connect_timeout=5) as conn:
            conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL)")
        wait_replayed(primary.url, standby.url)
        yield primary, standby


def one(url: str, query: str, *params: Any) -> Any:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None
    return row[0]


def note(primary_url: str) -> str:
    """A row committed on the primary: its body."""
    body = uuid.uuid4().hex
    with psycopg.connect(primary_url, connect_timeout=5) as conn:
        conn.execute("INSERT INTO notes (body) VALUES (%s)", (body,))
    return body


def notes_with(url: str, body: str) -> int:
    return int(one(url, "SELECT count(*) FROM notes WHERE body = %s", body))


def test_standby_is_in_recovery_and_replays_the_primary(
    replicated: tuple[RestartableCluster, Standby], record_property: Callable[[str, Any], None]
) -> None:
    primary, standby = replicated
    assert one(standby.url, "SELECT pg_is_in_recovery()") is True
    assert one(primary.url, "SELECT pg_is_in_recovery()") is False
    assert standby.port != primary.port
    assert standby.root != primary.root
    # Streaming, through its own slot (pg_basebackup -R -C -S).
    assert one(primary.url, "SELECT count(*) FROM pg_stat_replication") == 1
    slot = "SELECT slot_type FROM pg_replication_slots WHERE slot_name = %s"
    assert one(primary.url, slot, standby.slot) == "physical"

    body = note(primary.url)
    waited = wait_replayed(primary.url, standby.url)
    assert notes_with(standby.url, body) == 1
    report(
        record_property,
        "standby",
        f"made by pg_basebackup and started in {standby.creation_seconds:.2f}s; "
        f"a committed row replayed {waited * 1000:.0f} ms later",
    )


def test_standby_refuses_writes(replicated: tuple[RestartableCluster, Standby]) -> None:
    _, standby = replicated
    with (
        psycopg.connect(standby.url, autocommit=True, connect_timeout=5) as conn,
        pytest.raises(psycopg.errors.ReadOnlySqlTransaction) as refused,
    ):
        conn.execute("INSERT INTO notes (body) VALUES ('on the standby')")
    assert refused.value.sqlstate == "25006"


@pytest.mark.parametrize("stop", ["fast", "immediate"])
def test_stopped_standby_refuses_connections_and_serves_again_after_start(
    replicated: tuple[RestartableCluster, Standby], stop: str
) -> None:
    primary, standby = replicated
    (standby.stop_server if stop == "fast" else standby.crash_server)()
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(standby.url, connect_timeout=2)
    # Written while the standby is down: the slot keeps the WAL for it.
    body = note(primary.url)

    standby.start_server()
    wait_accepting(standby.url)
    wait_replayed(primary.url, standby.url)
    assert one(standby.url, "SELECT pg_is_in_recovery()") is True
    assert notes_with(standby.url, body) == 1


def test_wait_replayed_is_bounded(replicated: tuple[RestartableCluster, Standby]) -> None:
    primary, standby = replicated
    standby.stop_server()
    try:
        note(primary.url)
        started = time.monotonic()
        with pytest.raises(AssertionError, match="did not replay"):
            wait_replayed(primary.url, standby.url, timeout=0.5)
        assert time.monotonic() - started < 5
    finally:
        standby.start_server(wait=True)
    wait_replayed(primary.url, standby.url)


def test_removed_standby_leaves_no_directory_and_no_slot() -> None:
    with throwaway_cluster(replication=True) as primary:
        with hot_standby(primary) as standby:
            wait_replayed(primary.url, standby.url)
            assert one(primary.url, "SELECT count(*) FROM pg_replication_slots") == 1
        assert not standby.root.exists()
        assert not pgserver.answers(standby.url)
        assert one(primary.url, "SELECT count(*) FROM pg_replication_slots") == 0


def test_standby_of_a_primary_with_a_password() -> None:
    password = f"Pw-{uuid.uuid4().hex[:8]}-' \\@:/"
    with primary_and_standby(password=password) as (primary, standby):
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(standby.url.replace(f":{quote(password, safe='')}@", "@"))
        with psycopg.connect(primary.url, autocommit=True, connect_timeout=5) as conn:
            conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL)")
        body = note(primary.url)
        wait_replayed(primary.url, standby.url)
        assert notes_with(standby.url, body) == 1
