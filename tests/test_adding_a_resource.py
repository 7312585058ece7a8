"""The rendered README's "Adding a resource", followed as written: every file block written
where the README says, every shell line run in the order it gives, on a rendered service of its
own; then the revision autogenerate wrote must create the table and go down and up again, and
ruff, mypy --strict and the service's tests (the new test file included) pass."""

from __future__ import annotations

import contextlib
import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from harness.rendering import clean_env
from harness.services import migrate, render_synced, run, scratch_database, with_database

SECTION = "## Adding a resource"
BLOCK = re.compile(r"^```(python|sh)\n(.*?)^```$", re.M | re.S)
# The first file named in the text before a python block: the file the block holds.
FILE_NAME = re.compile(r"`((?:src|tests)/[\w/]+\.py)`")


def steps(readme: str) -> list[tuple[str, str, str]]:
    """(kind, file or "", body) of each block of the section, in order."""
    section = readme.split(f"{SECTION}\n", 1)[1].split("\n## ", 1)[0]
    found = []
    lead_starts = 0
    for block in BLOCK.finditer(section):
        kind, body = block.group(1), block.group(2)
        if kind == "python":
            names = FILE_NAME.findall(section[lead_starts : block.start()])
            assert names, f"no file named before the block:\n{body[:200]}"
            found.append((kind, names[0], body))
        else:
            found.append((kind, "", body))
        lead_starts = block.end()
    return found


def run_line(line: str, root: Path, env: dict[str, str]) -> str:
    """A shell line of the README (no shell syntax), run in `root`; its output."""
    return run(shlex.split(line), root, env, timeout=900)


@pytest.mark.slow
@pytest.mark.parametrize(
    "data",
    [
        {},  # the default answers
        {"db_driver": "aiosqlite", "with_example": False},
    ],
    ids=["asyncpg-example", "aiosqlite-bare"],
)
def test_adding_a_resource_as_the_readme_says(
    tmp_path: Path, pg_admin_url: str, data: dict[str, Any]
) -> None:
    root = render_synced(tmp_path / "service", **data)
    readme = (root / "README.md").read_text()
    revisions = root / "migrations" / "versions"
    before = set(revisions.glob("*.py"))
    with contextlib.ExitStack() as stack:
        if data.get("db_driver") == "aiosqlite":
            url = f"sqlite:///{tmp_path / 'dev.db'}"
        else:
            url = with_database(
                pg_admin_url, stack.enter_context(scratch_database(pg_admin_url, "adding"))
            )
        # The README's earlier steps: a database at head before the new model exists.
        migrate(root, url)
        env = clean_env(DATABASE_URL=url, TEST_DATABASE_URL=pg_admin_url)
        ran = []
        for kind, file_name, body in steps(readme):
            if kind == "python":
                (root / file_name).write_text(body)
                continue
            for line in body.strip().splitlines():
                ran.append(line)
                run_line(line, root, env)
        assert "uv run pytest" in ran, ran
        created = sorted(set(revisions.glob("*.py")) - before)
        assert len(created) == 1, created
        revision = created[0].read_text()
        assert re.search(r"create_table\(\s*[\"']orders[\"']", revision), revision
        assert re.search(r"drop_table\(\s*[\"']orders[\"']", revision), revision
        run_line("uv run alembic downgrade -1", root, env)
        run_line("uv run alembic upgrade head", root, env)
        run_line("uv run alembic check", root, env)
        # The new test file ran with the service's own tests, and passes on its own.
        output = run_line("uv run pytest -q -p no:cacheprovider tests/test_orders.py", root, env)
        assert re.search(r"\b3 passed\b", output), output
