"""The throwaway PostgreSQL cluster the suite falls back on really starts and goes away."""

from __future__ import annotations

import subprocess

import pytest

from harness import pgserver


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
