"""The rendered lint of migration revisions (tests/test_revisions_lint.py: squawk on each
revision's SQL alone) fails on an owner's revision that would block or break a live service,
naming squawk's rule, and passes the safe form of the same change. One rendered service (the
default answers, with the example's revisions) serves every case; each case writes its
revision on top of the example's and removes it afterwards."""

from __future__ import annotations

import shutil
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.rendering import clean_env
from harness.services import render_synced

REVISION = "migrations/versions/20270101_0100_owner_change.py"
HEADER = '''"""An owner's change to the example's items table."""

import sqlalchemy as sa
from alembic import op

revision = "0100"
down_revision = {down!r}


def upgrade() -> None:
'''


def body(code: str) -> str:
    """The body of upgrade(): `code`, dedented, then indented under the def."""
    return textwrap.indent(textwrap.dedent(code).strip() + "\n", "    ")


@dataclass(frozen=True)
class Case:
    name: str
    rule: str
    unsafe: str
    safe: dict[str, str]  # each safe form of the change, by name


CASES = [
    Case(
        "index-on-an-existing-table",
        "require-concurrent-index-creation",
        body('op.create_index("ix_items_price_cents", "items", ["price_cents"])'),
        # Outside the revision's transaction, while writes go on; IF NOT EXISTS: a run that
        # stopped half way can run again.
        {
            "concurrently": body("""
                with op.get_context().autocommit_block():
                    op.create_index(
                        "ix_items_price_cents",
                        "items",
                        ["price_cents"],
                        postgresql_concurrently=True,
                        if_not_exists=True,
                    )
            """),
            # The service's own helper, which also rebuilds an index a failed build left.
            "helper": body("""
                from migrations.indexes import create_index_concurrently

                create_index_concurrently("ix_items_price_cents", "items", ["price_cents"])
            """),
        },
    ),
    Case(
        "column-type-change",
        "changing-column-type",
        body('op.alter_column("items", "price_cents", type_=sa.Numeric(14, 2))'),
        # A new column beside the old one, which the next releases fill and read.
        {"new-column": body('op.add_column("items", sa.Column("price", sa.Numeric(14, 2)))')},
    ),
    Case(
        "not-null-column-without-a-default",
        "adding-required-field",
        body('op.add_column("items", sa.Column("sku", sa.Text(), nullable=False))'),
        {
            "with-a-default": body("""
                op.add_column(
                    "items", sa.Column("sku", sa.Text(), server_default="", nullable=False)
                )
            """),
            "nullable": body('op.add_column("items", sa.Column("sku", sa.Text(), nullable=True))'),
        },
    ),
    Case(
        "dropped-column",
        "ban-drop-column",
        body('op.drop_column("items", "description")'),
        # After the release that stopped using the column: the comment says so, right before
        # the statement it applies to.
        {
            "ignored-after-the-release": body(r"""
                op.execute(
                    "-- squawk-ignore ban-drop-column\n"
                    "ALTER TABLE items DROP COLUMN description"
                )
            """),
        },
    ),
]
SAFE_FORMS = {f"{case.name}-{name}": code for case in CASES for name, code in case.safe.items()}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return render_synced(tmp_path_factory.mktemp("squawk") / "service")


def lint(service: Path) -> subprocess.CompletedProcess[str]:
    """The service's own lint test, as its owner runs it."""
    command = ["uv", "run", "--no-sync", "pytest", "-q", "-p", "no:cacheprovider"]
    return subprocess.run(
        [*command, "tests/test_revisions_lint.py"],
        cwd=service,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def revision(service: Path) -> Iterator[Path]:
    """Where a case writes its revision; removed afterwards."""
    path = service / REVISION
    yield path
    path.unlink(missing_ok=True)


def write(path: Path, body: str, down: str | None = "0003") -> None:
    path.write_text(HEADER.format(down=down) + body)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_an_unsafe_revision_fails_naming_the_rule(
    service: Path, revision: Path, case: Case
) -> None:
    write(revision, case.unsafe)
    result = lint(service)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"[{case.rule}]" in result.stdout, result.stdout
    assert REVISION in result.stdout, result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("body", SAFE_FORMS.values(), ids=SAFE_FORMS.keys())
def test_a_safe_form_passes(service: Path, revision: Path, body: str) -> None:
    write(revision, body)
    result = lint(service)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout, result.stdout


@pytest.mark.slow
def test_a_service_without_revisions_passes_until_its_first_unsafe_one(
    service: Path, revision: Path, tmp_path: Path
) -> None:
    """As in a service without the example: no revision passes; a first revision (from
    base, so its SQL also creates Alembic's own table) is linted all the same."""
    versions = service / "migrations" / "versions"
    shipped = sorted(versions.glob("*.py"))
    assert len(shipped) == 2, shipped
    for path in shipped:
        shutil.move(path, tmp_path / path.name)
    try:
        result = lint(service)
        assert result.returncode == 0, result.stdout + result.stderr
        write(revision, CASES[0].unsafe.replace('"items"', '"orders"'), down=None)
        result = lint(service)
        assert result.returncode == 1, result.stdout + result.stderr
        assert "[require-concurrent-index-creation]" in result.stdout, result.stdout
        # Alembic's own table is no finding of the revision's.
        assert "alembic_version" not in result.stdout, result.stdout
    finally:
        for path in shipped:
            shutil.move(tmp_path / path.name, path)
