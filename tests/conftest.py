"""Fixtures of the template's own tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness import pgserver


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
