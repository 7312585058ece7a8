"""Streaming replication for tests: a primary throwaway cluster that accepts replication
connections, and a hot standby made from it with `pg_basebackup -R`, in a temporary directory
and on a port of its own, which can be stopped (fast or immediate), started again and removed.

    with primary_and_standby() as (primary, standby):
        with psycopg.connect(primary.url, autocommit=True) as conn:
            conn.execute("CREATE TABLE t AS SELECT 1 AS x")
        wait_replayed(primary.url, standby.url)
        standby.stop_server(); standby.start_server(wait=True)
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import psycopg

from .pgserver import HOW_TO_PROVIDE, NoServerError, ThrowawayCluster, find_bindir
from .services import RestartableCluster

# Every wait below is bounded by one of these.
REPLAY_TIMEOUT = 10.0
BASEBACKUP_TIMEOUT = 120.0
SLOT_RELEASE_TIMEOUT = 10.0
POLL_INTERVAL = 0.01
# Milliseconds between a standby's attempts to stream from a primary it lost.
RETRY_INTERVAL_MS = 200


class Standby(RestartableCluster):
    """A hot standby of `primary` (a ThrowawayCluster made with `replication=True`, started):
    `pg_basebackup -R` copies the primary's data directory and writes the standby's
    configuration (standby.signal, and primary_conninfo in postgresql.auto.conf), and the
    standby then streams the primary's write-ahead log through a replication slot of its
    own, so that the primary keeps the WAL a stopped standby still needs.

    Same user, password and fsync setting as the primary; loopback only, as the postgres
    user when running as root. It refuses writes (SQLSTATE 25006) and answers reads.
    `create()` makes and starts it; `stop_server()` (fast), `crash_server()` (immediate)
    and `start_server()` come from RestartableCluster; `stop()` removes it: the server, its
    directory and its slot on the primary (if the primary still answers)."""

    kind = "standby"

    def __init__(self, primary: ThrowawayCluster) -> None:
        if not primary.replication:
            raise ValueError("the primary does not accept replication: use replication=True")
        super().__init__(primary.bindir, fsync=primary.fsync, password=primary.password)
        self.primary = primary
        # Also the standby's application_name on the primary (pg_stat_replication).
        self.slot = f"standby_{self.port}"
        self.created = False  # the slot exists on the primary
        self.creation_seconds = 0.0

    def options(self) -> str:
        # A primary started again is streamed from within a fraction of a second, not the
        # default 5 s between the standby's attempts to reach it.
        return (
            f"{super().options()} -c hot_standby=on -c cluster_name={self.slot} "
            f"-c wal_retrieve_retry_interval={RETRY_INTERVAL_MS}"
        )

    def primary_conninfo(self) -> str:
        """How the standby reaches the primary; written into its configuration by -R."""
        conninfo = (
            f"host=127.0.0.1 port={self.primary.port} user=postgres application_name={self.slot}"
        )
        if self.password is not None:
            quoted = self.password.replace("\\", "\\\\").replace("'", "\\'")
            conninfo += f" password='{quoted}'"
        return conninfo

    def create(self) -> str:
        """Copy the primary with pg_basebackup -R and start the standby; return its URL once
        it accepts (read-only) connections."""
        started = time.monotonic()
        basebackup = [
            str(self.bindir / "pg_basebackup"),
            *("-D", str(self.data), "-d", self.primary_conninfo()),
            # -R: standby.signal and primary_conninfo; -C -S: the slot, made by the backup.
            *("-R", "-C", "-S", self.slot, "-X", "stream", "-c", "fast"),
        ]
        if not self.fsync:
            basebackup.append("--no-sync")
        self._run(*basebackup, timeout=BASEBACKUP_TIMEOUT)
        self.created = True
        self.pg_ctl_start(wait=True)
        self.creation_seconds = time.monotonic() - started
        return self.url

    def start(self) -> str:
        """A standby is made from its primary, never by initdb."""
        return self.create()

    def stop(self) -> None:
        """Remove the standby: its server (immediate stop), its directory, and its slot on
        the primary, so that the primary does not keep WAL for it."""
        try:
            super().stop()
        finally:
            if self.created:
                self._drop_slot()
                self.created = False

    def _drop_slot(self) -> None:
        """Drop the standby's slot on the primary, if the primary answers. The primary's WAL
        sender may hold the slot for a moment after the standby is gone: bounded retries."""
        deadline = time.monotonic() + SLOT_RELEASE_TIMEOUT
        drop = (
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s"
        )
        while True:
            try:
                with psycopg.connect(self.primary.url, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(drop, (self.slot,))
                return
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(POLL_INTERVAL)
            except psycopg.OperationalError:
                return  # the primary is gone, and its slots with it


def _lsn(url: str, query: str) -> str | None:
    with psycopg.connect(url, autocommit=True, connect_timeout=2) as conn:
        row = conn.execute(query).fetchone()
    return None if row is None or row[0] is None else str(row[0])


def wait_replayed(primary_url: str, standby_url: str, timeout: float = REPLAY_TIMEOUT) -> float:
    """Wait until the standby has replayed the primary's WAL up to the position it has now
    (pg_current_wal_lsn() on the primary, pg_last_wal_replay_lsn() on the standby); the
    seconds it took. Fails after `timeout`, with both positions; a standby that does not
    answer yet counts as behind."""
    started = time.monotonic()
    target = _lsn(primary_url, "SELECT pg_current_wal_lsn()")
    assert target is not None
    replayed: Any = "no answer"
    while True:
        try:
            with psycopg.connect(standby_url, autocommit=True, connect_timeout=2) as conn:
                row = conn.execute(
                    "SELECT pg_last_wal_replay_lsn(), pg_last_wal_replay_lsn() >= %s::pg_lsn",
                    (target,),
                ).fetchone()
            assert row is not None
            replayed = row[0]
            if row[1]:
                return time.monotonic() - started
        except psycopg.OperationalError as exc:
            replayed = f"no answer ({str(exc).strip().splitlines()[-1]})"
        if time.monotonic() - started > timeout:
            raise AssertionError(
                f"the standby did not replay the primary's WAL up to {target} within "
                f"{timeout}s: it is at {replayed}"
            )
        time.sleep(POLL_INTERVAL)


@contextlib.contextmanager
def hot_standby(primary: ThrowawayCluster) -> Iterator[Standby]:
    """A started hot standby of `primary` (made with `replication=True`), removed
    afterwards, with its replication slot."""
    standby = Standby(primary)
    try:
        standby.create()
        yield standby
    finally:
        standby.stop()


@contextlib.contextmanager
def primary_and_standby(**options: Any) -> Iterator[tuple[RestartableCluster, Standby]]:
    """A throwaway primary that accepts replication (`options`: fsync, password) and a hot
    standby of it, both started, both removed afterwards."""
    bindir = find_bindir()
    if bindir is None:
        raise NoServerError("no PostgreSQL server binaries for a standby. " + HOW_TO_PROVIDE)
    primary = RestartableCluster(bindir, replication=True, **options)
    try:
        primary.start()
        with hot_standby(primary) as standby:
            yield primary, standby
    finally:
        primary.stop()
