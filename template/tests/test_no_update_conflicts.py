"""Guard: unresolved `copier update` conflicts must not be committed.

copier leaves conflicts as inline markers or as `*.rej` files and still exits 0.
"""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", ".mypy_cache", ".pytest_cache", ".ruff_cache", "__pycache__"}
# Built from parts so that this file does not match itself.
MARKERS = ("<" * 7 + " ", ">" * 7 + " ")


def project_files() -> list[Path]:
    files = []
    for path in PROJECT_ROOT.rglob("*"):
        if path.is_file() and not SKIP_DIRS.intersection(path.relative_to(PROJECT_ROOT).parts):
            files.append(path)
    return files


def has_markers(path: Path) -> bool:
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except (UnicodeDecodeError, OSError):
        return False
    return any(line.startswith(MARKERS) for line in lines)


def test_no_update_conflicts_left() -> None:
    problems = [
        str(path.relative_to(PROJECT_ROOT))
        for path in project_files()
        if path.suffix == ".rej" or has_markers(path)
    ]
    assert not problems, "resolve these `copier update` conflicts first: " + ", ".join(problems)
