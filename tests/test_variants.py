"""Every variant, in an environment built only from its own pyproject.toml, passes its
linters, the strict type check and its own tests against a real database."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from harness.rendering import clean_env, render, variant_id, variants
from harness.services import run

# A variant's own test suite, on a busy machine.
SUITE_TIMEOUT = 600


@pytest.mark.slow
@pytest.mark.parametrize("data", list(variants()), ids=variant_id)
def test_variant_passes_its_own_checks(
    tmp_path: Path, pg_admin_url: str, data: dict[str, Any]
) -> None:
    root = render(tmp_path / "service", **data)
    env = clean_env(TEST_DATABASE_URL=pg_admin_url)
    # `uv sync` builds .venv from the rendered pyproject.toml alone (project + dev group).
    run(["uv", "sync", "--quiet"], root, env)
    tool = ["uv", "run", "--no-sync"]
    run([*tool, "ruff", "check", "."], root, env)
    run([*tool, "ruff", "format", "--check", "."], root, env)
    run([*tool, "mypy"], root, env)
    output = run([*tool, "pytest", "-q", "-p", "no:cacheprovider"], root, env, SUITE_TIMEOUT)
    summary = output.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary), summary
    # A skipped or xfailed test would hide an untested part of the variant.
    for word in ("skipped", "xfailed", "xpassed", "deselected", "error"):
        assert word not in summary, summary


@pytest.mark.slow
def test_pre_commit_hooks_pass_offline(tmp_path: Path) -> None:
    """The rendered .pre-commit-config.yaml runs the project's own ruff and mypy through uv,
    with no network: run here in a network namespace of its own."""
    root = render(tmp_path / "service")
    env = clean_env()
    run(["uv", "sync", "--quiet"], root, env)
    run(["git", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    output = run(
        [
            "unshare",
            "--map-root-user",
            "--net",
            "uv",
            "run",
            "--no-sync",
            "pre-commit",
            "run",
            "--all-files",
        ],
        root,
        env,
    )
    for hook in ("ruff check", "ruff format", "mypy --strict"):
        assert re.search(rf"^{re.escape(hook)}\.+Passed$", output, re.M), output
