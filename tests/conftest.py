"""Fixtures of the template's own tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _pytest.nodeid import NodeId

from harness import pgserver
from harness.services import render_synced


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A PostgreSQL server where the rendered projects' tests create their databases."""
    try:
        url, cluster = pgserver.provide()
    except pgserver.NoServerError as exc:
        pytest.fail(str(exc), pytrace=False)
    try:
        yield url
    finally:
        if cluster is not None:
            cluster.stop()


@pytest.fixture(scope="session")
def default_project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default service (asyncpg, Alembic, the example), rendered and synced once per run
    (per pytest-xdist worker), for the tests that run it against a throwaway cluster of their
    own (tests/test_crash.py, test_kill.py, test_secrets.py). A test may add a module of its
    own to it (the kill test's scaffold), which the others never import; none changes the
    rendered files."""
    return render_synced(
        tmp_path_factory.mktemp("default") / "service",
        db_driver="asyncpg",
        migrations="alembic",
        with_example=True,
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`--dist loadgroup` on pytest 9.2: pytest-xdist 3.8 marks a test's group by appending
    it to `item._nodeid`, which pytest 9.2 no longer reads (its node ids are structured), so
    every group would be spread over the workers and its module fixtures built on each
    (pytest-dev/pytest-xdist#1386). The same suffix on the structured id; nothing to do
    where pytest-xdist's own suffix took effect."""
    if not getattr(config.option, "loadgroup", False):
        return
    for item in items:
        marks = item.iter_markers("xdist_group")
        groups = {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in marks}
        suffix = "@" + "_".join(sorted(groups))
        if groups and not item.nodeid.endswith(suffix) and hasattr(item, "_id"):
            item._id = NodeId.parse(item.nodeid + suffix)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Figures that tests recorded as the user property "figures" (image size, build and
    shutdown times), also when pytest-xdist ran them in workers that print nowhere."""
    lines = [
        value
        for key in ("passed", "failed")
        for report in terminalreporter.stats.get(key, [])
        if getattr(report, "when", "") == "call"
        for name, value in getattr(report, "user_properties", [])
        if name == "figures"
    ]
    if lines:
        terminalreporter.section("measured figures")
        for line in lines:
            terminalreporter.write_line(line)
