"""The template's own files: README questions table, code style and types."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from harness.rendering import REPO_ROOT, questions


def readme_rows() -> list[list[str]]:
    text = (REPO_ROOT / "README.md").read_text()
    table = text.split("<!-- questions:start -->")[1].split("<!-- questions:end -->")[0]
    lines = [line for line in table.strip().splitlines() if line.startswith("|")][2:]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def expected_type(default: object) -> str:
    if isinstance(default, bool):
        return "bool"
    if isinstance(default, int):
        return "int"
    return "str"


def test_readme_questions_table_matches_copier_yml() -> None:
    rows = readme_rows()
    asked = questions()
    assert [row[0].strip("`") for row in rows] == list(asked)
    for name, type_, default, allowed, _ in rows:
        question = asked[name.strip("`")]
        assert type_ == expected_type(question["default"]), name
        if "{{" not in str(question["default"]):
            shown = (
                str(question["default"]).lower()
                if isinstance(question["default"], bool)
                else str(question["default"])
            )
            assert default == f"`{shown}`", name
        for choice in question.get("choices", {}).values():
            assert f"`{choice}`" in allowed, (name, choice)


def test_readme_quick_start_has_two_commands() -> None:
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"## Quick start\n\n```sh\n(.*?)```", text, re.S)
    assert block is not None
    commands = block.group(1).strip().splitlines()
    assert len(commands) == 2
    assert "copier copy" in commands[0]
    assert commands[1] == "uv run pytest"
    assert "uv run pytest" in (REPO_ROOT / ".ci" / "run").read_text()


def test_template_code_passes_ruff() -> None:
    # No cache: nothing a test runs writes into the tree that copier renders from.
    for args in (["check", "--no-cache", "."], ["format", "--no-cache", "--check", "."]):
        result = subprocess.run(["ruff", *args], cwd=REPO_ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_harness_bench_and_tests_pass_mypy(tmp_path: Path) -> None:
    """mypy --strict over the files pyproject.toml's [tool.mypy] names (harness, bench,
    tests, and the programs the tests copy into rendered projects)."""
    mypy = [sys.executable, "-m", "mypy", "--cache-dir", str(tmp_path / "mypy")]
    result = subprocess.run(mypy, cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
