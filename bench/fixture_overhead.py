"""Per-test cost of the rendered project's isolation fixture against recreating the tables.

The template's `tests/conftest.py` isolates tests with one connection in an outer
transaction: sessions join it with `join_transaction_mode="create_savepoint"`, so their
commits become savepoints, and the transaction is rolled back after each test. The usual
alternative recreates the tables for every test (`drop_all` + `create_all` of
`Base.metadata`) and gives sessions on the engine, whose commits are real.

The template is rendered (asyncpg, with_example=true, Alembic) and three generated test files
of N tiny tests each are run with the rendered project's own pytest against PostgreSQL:

- baseline: no database fixture at all, so pytest's (and pytest-asyncio's) own per-test cost
  can be taken out;
- savepoint rollback: the sessions of the project's `database` fixture;
- recreate tables: a fixture in the generated file that drops and creates every table on the
  project's `owner_engine` before each test and gives `make_sessionmaker(owner_engine)`.

Each database test inserts one item, commits, reads it back and counts the table.
Per row: `wall_s` is the wall time of the pytest process, `pytest_s` the duration pytest
reports, `per_test_ms` that duration over N, and `overhead_ms` the wall time over the
baseline's, over N. The database rows hold the tests' own queries too, alike in both, so the
difference between them is the fixtures alone. Both database cases also pay once for creating
the test database and running the migrations, which the baseline does not; that is spread
over the N tests.
"""

from __future__ import annotations

import os
import re
import string
import subprocess
import time
from pathlib import Path

import yaml

from harness.rendering import clean_env, render

ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
# Each file runs this many times; the lowest wall time (and lowest pytest duration) counts,
# so a one-off stall of the machine does not end up in the figures.
RUNS = 2
PYTEST = ("uv", "run", "--no-sync", "pytest", "-q", "-p", "no:cacheprovider")
# What the savepoint case relies on in the rendered conftest.
CONFTEST_MARKERS = (
    "async def owner_engine(",
    "async def connection(",
    "def database(",
    'join_transaction_mode="create_savepoint"',
    "await transaction.rollback()",
)

# The body shared by both database cases; `maker` names the fixture that gives the sessions.
DB_TESTS = """
@pytest.mark.parametrize("n", range($n_tests))
async def test_insert_read(${maker}: async_sessionmaker[AsyncSession], n: int) -> None:
    async with ${maker}() as session:
        item = Item(name=f"item-{n}", price_cents=n)
        session.add(item)
        await session.commit()
    async with ${maker}() as session:
        stored = await session.get(Item, item.id)
        count = await session.scalar(select(func.count()).select_from(Item))
    assert stored is not None
    assert (stored.name, stored.price_cents) == (f"item-{n}", n)
    # Nothing is left over from the tests before.
    assert count == 1
"""

BASELINE_FILE = '''"""Generated: $n_tests tests without a database fixture (pytest's own cost)."""

from __future__ import annotations

import pytest

from ${package}.models.item import Item


@pytest.mark.parametrize("n", range($n_tests))
async def test_in_memory(n: int) -> None:
    item = Item(name=f"item-{n}", price_cents=n)
    assert (item.name, item.price_cents) == (f"item-{n}", n)
'''

SAVEPOINT_FILE = (
    '''"""Generated: $n_tests tests on the project's savepoint sessions."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ${package}.db import Database
from ${package}.models.item import Item


@pytest.fixture
def sessionmaker(database: Database) -> async_sessionmaker[AsyncSession]:
    """The project's per-test Database: its sessions join the test's transaction."""
    return database.sessionmaker

'''
    + DB_TESTS
)

RECREATE_FILE = (
    '''"""Generated: $n_tests tests on tables dropped and created for each test."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from ${package}.db import Base, make_sessionmaker
from ${package}.models.item import Item


@pytest.fixture
async def fresh_sessionmaker(owner_engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Every table dropped and created again (by the schema's owner); sessions on that
    engine, commits real."""
    async with owner_engine.begin() as connection:
        await connection.run_sync(Base.metadata.drop_all)
        await connection.run_sync(Base.metadata.create_all)
    return make_sessionmaker(owner_engine)

'''
    + DB_TESTS
)

# (case, generated file, source, fixture giving the sessions)
CASES = (
    ("baseline (no database fixture)", "test_bench_baseline.py", BASELINE_FILE, ""),
    (
        "savepoint rollback (template fixture)",
        "test_bench_savepoint.py",
        SAVEPOINT_FILE,
        "sessionmaker",
    ),
    (
        "drop_all + create_all per test",
        "test_bench_recreate.py",
        RECREATE_FILE,
        "fresh_sessionmaker",
    ),
)

Row = dict[str, object]


def prepare(work: Path) -> Path:
    """Render the service and build its environment; return the project directory."""
    project = render(work / "svc", db_driver="asyncpg", with_example=True)
    subprocess.run(["uv", "sync", "--quiet"], cwd=project, env=clean_env(), check=True)
    conftest = (project / "tests" / "conftest.py").read_text()
    missing = [marker for marker in CONFTEST_MARKERS if marker not in conftest]
    if missing:
        raise RuntimeError(f"the rendered tests/conftest.py no longer has: {missing}")
    return project


def write_tests(project: Path, n_tests: int) -> list[tuple[str, Path]]:
    """Write the generated test files; return (case, path relative to the project)."""
    answers = yaml.safe_load((project / ".copier-answers.yml").read_text())
    cases = []
    for case, name, source, maker in CASES:
        path = Path("tests") / name
        text = string.Template(source).substitute(
            package=answers["package_name"], n_tests=n_tests, maker=maker
        )
        (project / path).write_text(text)
        cases.append((case, path))
    return cases


def run_pytest(project: Path, path: Path, n_tests: int) -> tuple[float, float]:
    """One pytest process on `path`: (wall seconds, pytest's own duration in seconds)."""
    cmd = [*PYTEST, str(path)]
    start = time.perf_counter()
    result = subprocess.run(
        cmd,
        cwd=project,
        env=clean_env(TEST_DATABASE_URL=ADMIN_URL),
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    output = result.stdout + result.stderr
    summary = re.search(r"(\d+) passed.* in ([\d.]+)s", output)
    if result.returncode != 0 or summary is None or int(summary[1]) != n_tests:
        raise RuntimeError(
            f"{' '.join(cmd)} did not pass {n_tests} tests "
            f"(exit {result.returncode}):\n{output[-4000:]}"
        )
    return wall, float(summary[2])


def run(work: Path, n_tests: int = 300) -> list[Row]:
    """Every case with `n_tests` tests, the rendered project under `work`."""
    project = prepare(work)
    cases = write_tests(project, n_tests)
    walls: dict[str, list[float]] = {case: [] for case, _ in cases}
    durations: dict[str, list[float]] = {case: [] for case, _ in cases}
    # Rounds interleave the cases, so a slow spell of the machine hits them alike.
    for _ in range(RUNS):
        for case, path in cases:
            wall, duration = run_pytest(project, path, n_tests)
            walls[case].append(wall)
            durations[case].append(duration)
    baseline_wall = min(walls[cases[0][0]])
    rows: list[Row] = []
    for case, _ in cases:
        wall = min(walls[case])
        rows.append(
            {
                "case": case,
                "tests": n_tests,
                "wall_s": round(wall, 3),
                "pytest_s": round(min(durations[case]), 3),
                "per_test_ms": round(min(durations[case]) * 1000 / n_tests, 3),
                "overhead_ms": round((wall - baseline_wall) * 1000 / n_tests, 3),
            }
        )
    return rows
