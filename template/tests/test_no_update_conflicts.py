"""Guard: unresolved `copier update` conflicts must not be committed.

copier leaves conflicts as inline markers or as `*.rej` files and still exits 0. Run it as a
script too (`python3 tests/test_no_update_conflicts.py`): it needs only the standard library,
so it works even when a marker in the code stops the test suite from importing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".git", ".venv", ".mypy_cache", ".pytest_cache", ".ruff_cache", "__pycache__"}
# Built from parts so that this file does not match itself.
MARKERS = ("<" * 7 + " ", ">" * 7 + " ")


def project_files() -> list[Path]:
    files: list[Path] = []
    for folder, subfolders, names in os.walk(PROJECT_ROOT):
        subfolders[:] = [d for d in subfolders if d not in SKIP_DIRS]  # never enter them
        files.extend(Path(folder, name) for name in names)
    return files


def has_markers(path: Path) -> bool:
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except (UnicodeDecodeError, OSError):
        return False
    return any(line.startswith(MARKERS) for line in lines)


def unresolved() -> list[str]:
    """Files with conflict markers, and `.rej` files, relative to the project."""
    return sorted(
        str(path.relative_to(PROJECT_ROOT))
        for path in project_files()
        if path.suffix == ".rej" or has_markers(path)
    )


def test_no_update_conflicts_left() -> None:
    problems = unresolved()
    assert not problems, "resolve these `copier update` conflicts first: " + ", ".join(problems)


if __name__ == "__main__":
    for problem in unresolved():
        print(f"unresolved copier update conflict: {problem}")
    sys.exit(1 if unresolved() else 0)
