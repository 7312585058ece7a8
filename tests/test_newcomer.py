"""What a newcomer to a rendered service runs into outside the uv route: installing it with
pip, autogenerating a migration after a plain (non-editable) `pip install .`, and creating a
revision without the virtualenv on PATH. Each test installs a real environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness.rendering import clean_env, render
from harness.services import run, scratch_database, with_database

PACKAGE = "my_service"
# An install, or a service's own test suite, on a busy machine.
SLOW_STEP_TIMEOUT = 600


def user_env(*, without: tuple[str, ...] = (), **extra: str) -> dict[str, str]:
    """clean_env() with PATH as a user's shell has it: without this suite's virtualenv, and
    without any directory holding one of the programs in `without`."""
    env = clean_env(**extra)
    suite_bin = Path(sys.prefix) / "bin"
    entries = env.get("PATH", os.defpath).split(os.pathsep)
    env["PATH"] = os.pathsep.join(
        entry
        for entry in entries
        if entry
        and Path(entry) != suite_bin
        and not any(shutil.which(program, path=entry) for program in without)
    )
    return env


def activated(env: dict[str, str], venv: Path) -> dict[str, str]:
    """`env` as `. .venv/bin/activate` leaves it."""
    return {**env, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}"}


def readme_block(readme: str, heading: str) -> str:
    """The first ```sh block after `heading` in the rendered README."""
    match = re.search(rf"^{re.escape(heading)}\n.*?^```sh\n(.*?)^```", readme, re.M | re.S)
    assert match, f"no sh block under {heading!r} in the rendered README"
    return match.group(1)


def new_revisions(root: Path, before: set[Path]) -> list[Path]:
    return sorted(set((root / "migrations" / "versions").glob("*.py")) - before)


@pytest.mark.slow
def test_pip_route_in_the_readme_installs_the_dev_tools(tmp_path: Path, pg_admin_url: str) -> None:
    root = render(tmp_path / "service")
    block = readme_block((root / "README.md").read_text(), "### With pip instead of uv")
    env = user_env(TEST_DATABASE_URL=pg_admin_url)
    # The commands exactly as documented, in one shell, from the service's root.
    output = run(["bash", "-e", "-c", block], root, env, SLOW_STEP_TIMEOUT)
    assert "does not provide the extra" not in output, output[-3000:]

    venv = root / ".venv"
    env = activated(env, venv)
    output = run(
        [str(venv / "bin" / "pytest"), "-q", "-p", "no:cacheprovider"], root, env, SLOW_STEP_TIMEOUT
    )
    summary = output.strip().splitlines()[-1]
    assert re.search(r"\d+ passed", summary), summary
    for word in ("failed", "skipped", "xfailed", "xpassed", "deselected", "error"):
        assert word not in summary, summary
    output = run([str(venv / "bin" / "mypy")], root, env)
    assert output.startswith("Success"), output


@pytest.mark.slow
def test_revisions_after_a_plain_pip_install(tmp_path: Path, pg_admin_url: str) -> None:
    """`pip install .` (no dev tools, so no ruff; not editable, so the package is a copy in
    site-packages): autogenerate compares the source, and writes the revision unformatted
    with a note. With ruff installed but refusing to run, no revision is left behind."""
    root = render(tmp_path / "service")
    venv = tmp_path / "venv"
    env = user_env(without=("ruff",))
    run(["python3", "-m", "venv", str(venv)], tmp_path, env)
    pip = str(venv / "bin" / "pip")
    run([pip, "install", "--quiet", "."], root, env, SLOW_STEP_TIMEOUT)
    installed = run(
        [str(venv / "bin" / "python"), "-c", f"import {PACKAGE}; print({PACKAGE})"], tmp_path, env
    )
    assert "site-packages" in installed, installed
    versions = root / "migrations" / "versions"

    with scratch_database(pg_admin_url, "test_newcomer") as name:
        # The virtualenv active, as a pip user works.
        env = activated(env, venv)
        env["DATABASE_URL"] = with_database(pg_admin_url, name)
        alembic = str(venv / "bin" / "alembic")
        run([alembic, "upgrade", "head"], root, env)

        model = root / "src" / PACKAGE / "models" / "item.py"
        source = model.read_text()
        anchor = '    __tablename__ = "items"\n'
        assert anchor in source, source
        column = "    nickname: Mapped[str | None]\n"
        model.write_text(source.replace(anchor, anchor + column))

        before = set(versions.glob("*.py"))
        output = run([alembic, "revision", "--autogenerate", "-m", "add nickname"], root, env)
        [revision] = new_revisions(root, before)
        assert f"ruff is not installed: {revision} is left as written" in output, output
        text = revision.read_text()
        assert re.search(r"op\.add_column\(\s*.items.,\s*sa\.Column\(\s*.nickname.", text), text

    # ruff installed, and a configuration it refuses: the hook fails, and takes the new
    # revision with it, as the command reports a failure.
    run([pip, "install", "--quiet", "ruff"], root, env)
    (root / "ruff.toml").write_text("line-length = 'not a number'\n")
    before = set(versions.glob("*.py"))
    result = subprocess.run(
        [alembic, "revision", "-m", "add orders"], cwd=root, env=env, capture_output=True, text=True
    )
    assert result.returncode != 0, result.stdout + result.stderr
    assert re.search(r"ruff check failed; .* removed", result.stderr), result.stderr
    assert set(versions.glob("*.py")) == before


@pytest.mark.slow
def test_revision_hooks_run_without_the_virtualenv_on_path(tmp_path: Path) -> None:
    root = render(tmp_path / "service")
    run(["uv", "sync", "--quiet"], root, clean_env())
    env = user_env(without=("ruff",))
    assert shutil.which("ruff", path=env["PATH"]) is None, env["PATH"]

    venv_bin = root / ".venv" / "bin"
    before = set((root / "migrations" / "versions").glob("*.py"))
    output = run([str(venv_bin / "alembic"), "revision", "-m", "add orders"], root, env)
    [revision] = new_revisions(root, before)
    assert "Running post write hook 'ruff'" in output, output
    run([str(venv_bin / "ruff"), "format", "--check", str(revision)], root, env)
    run([str(venv_bin / "ruff"), "check", str(revision)], root, env)
