"""Steps for copier `_migrations`: carry answers and files forward when the template
renames a question or moves a file. copier runs them inside the service being updated.

    rename-answer OLD NEW   stage "before": the answers file calls OLD by its new name, so
                            the update keeps the service's answer instead of the default.
    move-file OLD NEW       stage "after": the service's own version of OLD (from the last
                            commit, since copier deletes OLD) replaces the freshly rendered
                            NEW. For a file moved without other changes in that release.

Uses only the standard library: it runs with the Python that runs copier.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

ANSWERS_FILE = Path(".copier-answers.yml")


def rename_answer(old: str, new: str) -> str:
    text = ANSWERS_FILE.read_text()
    if re.search(rf"^{re.escape(new)}:", text, re.M):
        return f"{ANSWERS_FILE}: {new} already answered; nothing to rename"
    renamed, count = re.subn(rf"^{re.escape(old)}:", f"{new}:", text, flags=re.M)
    if not count:
        return f"{ANSWERS_FILE}: no answer for {old}; {new} takes its default"
    ANSWERS_FILE.write_text(renamed)
    return f"{ANSWERS_FILE}: answer {old} is now {new}"


def committed(path: str) -> bytes | None:
    """The file as of the last commit, or None if it was not committed."""
    result = subprocess.run(["git", "show", f"HEAD:{path}"], capture_output=True, check=False)
    return result.stdout if result.returncode == 0 else None


def move_file(old: str, new: str) -> str:
    mine = committed(old)
    if mine is None:
        return f"{old} was not in the last commit; nothing to move"
    target = Path(new)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.read_bytes() != mine:
        target.write_bytes(mine)
    Path(old).unlink(missing_ok=True)
    return f"moved {old} to {new}, keeping its content from the last commit"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    for name in ("rename-answer", "move-file"):
        step = sub.add_parser(name)
        step.add_argument("old")
        step.add_argument("new")
    args = parser.parse_args(argv)
    if args.step == "rename-answer":
        print(rename_answer(args.old, args.new))
    else:
        print(move_file(args.old, args.new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
