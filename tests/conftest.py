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
