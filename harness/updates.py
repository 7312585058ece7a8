"""Update-test helpers: template repos with their own version tags, services under git."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import copier

from .rendering import REPO_ROOT, render

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Template Tests",
    "GIT_AUTHOR_EMAIL": "tests@example.invalid",
    "GIT_COMMITTER_NAME": "Template Tests",
    "GIT_COMMITTER_EMAIL": "tests@example.invalid",
}
# What a template version consists of; the rest of this repository is not the template.
TEMPLATE_PATHS = ("copier.yml", "template", "extensions", "includes", "scripts")
RELEASE_HEADING = re.compile(r"^## (\d+\.\d+\.\d+) - \d{4}-\d{2}-\d{2}$", re.M)


def git(cwd: Path, *args: str) -> str:
    result = subprocess.run(
        ["git", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, **GIT_IDENTITY},
    )
    assert result.returncode == 0, f"git {' '.join(args)}: {result.stderr}"
    return result.stdout


def releases() -> list[tuple[str, str]]:
    """(version, commit) of every release in CHANGELOG.md, newest first. A release's commit
    is the one that added its heading, so no tag is needed (a fresh clone may not have tags)."""
    found = []
    for match in RELEASE_HEADING.finditer((REPO_ROOT / "CHANGELOG.md").read_text()):
        heading = match.group(0)
        commits = git(REPO_ROOT, "log", "--format=%H", "-S", heading, "--", "CHANGELOG.md").split()
        assert commits, f"no commit added {heading!r}; is this a shallow clone?"
        found.append((match.group(1), commits[-1]))
    assert found, "CHANGELOG.md has no released version (## X.Y.Z - YYYY-MM-DD)"
    return found


def previous_release() -> tuple[str, str]:
    """The newest release older than this working tree: the first in CHANGELOG.md while an
    "## Unreleased" section is on top, otherwise (the working tree is a release) the next."""
    unreleased = "\n## Unreleased\n" in (REPO_ROOT / "CHANGELOG.md").read_text()
    found = releases()
    return found[0] if unreleased else found[1]


class TemplateRepo:
    """A throwaway git repository holding versions of the template."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True)
        git(path, "init", "-q", "-b", "main")

    def _clear(self) -> None:
        for child in self.path.iterdir():
            if child.name != ".git":
                shutil.rmtree(child) if child.is_dir() else child.unlink()

    def load_working_tree(self) -> None:
        """The template as it is in this checkout, uncommitted changes included."""
        self._clear()
        listed = git(REPO_ROOT, "ls-files", "-co", "--exclude-standard", "--", *TEMPLATE_PATHS)
        for name in listed.splitlines():
            source = REPO_ROOT / name
            if source.is_file():
                target = self.path / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)

    def load_commit(self, commit: str) -> None:
        """The template as it was at `commit` of this repository."""
        self._clear()
        present = set(git(REPO_ROOT, "ls-tree", "--name-only", commit).split())
        paths = [p for p in TEMPLATE_PATHS if p in present]
        archive = subprocess.run(
            ["git", "archive", commit, "--", *paths], cwd=REPO_ROOT, capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(self.path)], input=archive, check=True)

    def edit(self, name: str, old: str, new: str) -> None:
        path = self.path / name
        text = path.read_text()
        assert old in text, f"{name} does not contain {old!r}"
        path.write_text(text.replace(old, new))

    def append(self, name: str, text: str) -> None:
        path = self.path / name
        path.write_text(path.read_text() + text)

    def release(self, version: str) -> None:
        git(self.path, "add", "-A")
        git(self.path, "commit", "-q", "--allow-empty", "-m", f"template {version}")
        git(self.path, "tag", "-a", version, "-m", version)


def copy_service(template: Path, dst: Path, version: str, **data: Any) -> Path:
    """Render `version` of the template and commit it, as a user would."""
    render(dst, src=template, vcs_ref=version, **data)
    git(dst, "init", "-q", "-b", "main")
    commit_all(dst, "rendered from the template")
    return dst


def commit_all(service: Path, message: str) -> None:
    git(service, "add", "-A")
    git(service, "commit", "-q", "-m", message)


def update_service(service: Path, vcs_ref: str | None = None, **options: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        copier.run_update(
            str(service),
            vcs_ref=vcs_ref,
            defaults=True,
            overwrite=True,
            unsafe=True,
            quiet=True,
            **options,
        )


def tree(root: Path) -> dict[str, bytes]:
    """Every file below root (git metadata and tool caches excluded), by relative path."""
    skip = {".git", ".venv", "__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not skip.intersection(p.relative_to(root).parts)
    }


def unmerged(service: Path) -> list[str]:
    return sorted({line.split("\t")[1] for line in git(service, "ls-files", "-u").splitlines()})
