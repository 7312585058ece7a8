"""Bad answers are refused with a message naming the question, and nothing is written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from harness.rendering import REPO_ROOT, questions, render

BAD_ANSWERS: list[tuple[dict[str, Any], str]] = [
    # wrong type
    ({"db_pool_size": "abc"}, r"question 'db_pool_size'.*whole number >= 1"),
    ({"db_pool_size": 2.5}, r"question 'db_pool_size'.*whole number >= 1"),
    ({"db_max_overflow": "many"}, r"question 'db_max_overflow'.*whole number >= 0"),
    ({"db_pool_timeout": "soon"}, r"question 'db_pool_timeout'.*>= 1"),
    ({"db_pool_recycle": "hourly"}, r"question 'db_pool_recycle'.*-1 \(disabled\)"),
    ({"db_statement_timeout": "x"}, r"question 'db_statement_timeout'.*0 \(disabled\)"),
    ({"db_pool_pre_ping": "maybe"}, r"question 'db_pool_pre_ping'.*true or false"),
    ({"db_echo": 3}, r"question 'db_echo'.*true or false"),
    ({"with_example": "sure"}, r"question 'with_example'.*true or false"),
    ({"metrics": "yes please"}, r"question 'metrics'.*true or false"),
    ({"tracing": "sometimes"}, r"question 'tracing'.*true or false"),
    ({"read_replica": "one"}, r"question 'read_replica'.*true or false"),
    # out of range
    ({"db_pool_size": 0}, r"question 'db_pool_size'.*>= 1"),
    ({"db_max_overflow": -1}, r"question 'db_max_overflow'.*>= 0"),
    ({"db_pool_timeout": 0}, r"question 'db_pool_timeout'.*>= 1"),
    ({"db_pool_recycle": 0}, r"question 'db_pool_recycle'.*-1 \(disabled\)"),
    ({"db_pool_recycle": -2}, r"question 'db_pool_recycle'.*-1 \(disabled\)"),
    ({"db_statement_timeout": -1}, r"question 'db_statement_timeout'.*0 \(disabled\)"),
    # invalid identifiers and names
    ({"package_name": "My-Service"}, r"question 'package_name'.*lowercase Python identifier"),
    ({"package_name": "1service"}, r"question 'package_name'.*lowercase Python identifier"),
    ({"package_name": "class"}, r"question 'package_name'.*Python keyword"),
    ({"package_name": "match"}, r"question 'package_name'.*Python keyword"),
    ({"package_name": "json"}, r"question 'package_name'.*shadow a module"),
    ({"package_name": "sqlalchemy"}, r"question 'package_name'.*shadow a module"),
    ({"db_name": "my-db"}, r"question 'db_name'.*lowercase letters"),
    ({"db_name": "Orders"}, r"question 'db_name'.*lowercase letters"),
    ({"db_name": "a" * 50}, r"question 'db_name'.*at most 49"),
    ({"project_name": "  "}, r"question 'project_name'.*empty"),
    ({"project_name": 'say "hi"'}, r"question 'project_name'.*double quotes"),
    # unknown choices
    ({"db_driver": "mysql"}, r"'db_driver'.*not in \['asyncpg', 'psycopg', 'aiosqlite'\]"),
    ({"migrations": "yoyo"}, r"'migrations'.*not in \['alembic', 'none'\]"),
    ({"db_pooler": "pgpool"}, r"'db_pooler'.*not in \['none', 'pgbouncer'\]"),
    ({"id_type": "int4"}, r"'id_type'.*not in \['bigint', 'integer'\]"),
]


@pytest.mark.parametrize(("data", "message"), BAD_ANSWERS, ids=lambda v: str(v)[:40])
def test_bad_answer_is_refused_and_nothing_is_written(
    tmp_path: Path, data: dict[str, Any], message: str
) -> None:
    dst = tmp_path / "service"
    with pytest.raises(ValueError, match=message):
        render(dst, **data)
    assert not dst.exists()


def test_every_question_that_can_be_answered_wrong_has_a_bad_answer() -> None:
    """Derived from copier.yml: each question with a validator or choices is in BAD_ANSWERS."""
    checked = {name for data, _ in BAD_ANSWERS for name in data}
    refusable = {n for n, q in questions().items() if "validator" in q or "choices" in q}
    assert refusable - checked == set()


def test_bad_answer_leaves_an_existing_destination_untouched(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="db_pool_size"):
        render(tmp_path, db_pool_size=-5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_cli_refuses_a_bad_answer_naming_the_question(tmp_path: Path) -> None:
    dst = tmp_path / "service"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "copier",
            "copy",
            "--trust",
            "--defaults",
            "--vcs-ref",
            "HEAD",
            "--data",
            "db_pool_size=abc",
            str(REPO_ROOT),
            str(dst),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "Validation error for question 'db_pool_size'" in result.stderr
    assert not dst.exists()


@pytest.mark.parametrize(
    ("project_name", "package_name"),
    [
        ("My Service", "my_service"),
        ("Order-Tracker 2", "order_tracker_2"),
        ("3D Prints", "svc_3d_prints"),
    ],
)
def test_package_and_db_names_derive_from_the_project_name(
    tmp_path: Path, project_name: str, package_name: str
) -> None:
    dst = render(tmp_path / "s", project_name=project_name)
    answers = yaml.safe_load((dst / ".copier-answers.yml").read_text())
    assert answers["package_name"] == package_name
    assert answers["db_name"] == package_name
    assert (dst / "src" / package_name / "main.py").is_file()


def test_postgresql_questions_are_not_asked_for_sqlite(tmp_path: Path) -> None:
    dst = render(tmp_path / "s", db_driver="aiosqlite")
    answers = yaml.safe_load((dst / ".copier-answers.yml").read_text())
    for name in ("db_statement_timeout", "db_pooler", "read_replica", "id_type"):
        assert name not in answers
    assert "STATEMENT_TIMEOUT" not in (dst / ".env.example").read_text()
