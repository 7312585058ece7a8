"""Steps for copier `_migrations`: carry answers and files forward when the template
renames a question or moves a file. copier runs them inside the service being updated.

    rename-answer OLD NEW   stage "before": the answers file calls OLD by its new name, so
                            the update keeps the service's answer instead of the default.
    set-answer NAME VALUE   stage "before": the answers file answers NAME with VALUE, unless
                            NAME is answered already. For a new question whose default
                            would change what services from earlier releases have.
    move-file OLD NEW       stage "after": the service's own version of OLD (from the last
                            commit, since copier deletes OLD) replaces the freshly rendered
                            NEW. For a file moved without other changes in that release.
    move-imports OLD NEW NAME...
                            stage "after": in the service's Python files, imports of NAME
                            from module OLD (absolute or relative) come from module NEW.
                            For names that moved to another module; the block
                            of imports is left sorted as ruff sorts it.

Uses only the standard library: it runs with the Python that runs copier.
"""

from __future__ import annotations

import argparse
import ast
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


def set_answer(name: str, value: str) -> str:
    text = ANSWERS_FILE.read_text()
    if re.search(rf"^{re.escape(name)}:", text, re.M):
        return f"{ANSWERS_FILE}: {name} already answered; kept"
    ANSWERS_FILE.write_text(f"{text.rstrip(chr(10))}\n{name}: {value}\n")
    return f"{ANSWERS_FILE}: {name} answered {value}"


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


# The rendered service's line length (pyproject.toml, [tool.ruff]).
MAX_LINE = 100
SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".mypy_cache", ".ruff_cache", "node_modules"}


def module_of(path: Path) -> str:
    """The dotted module a file under src/ or the project root defines."""
    parts = list(path.with_suffix("").parts)
    if parts and parts[0] == "src":
        parts = parts[1:]
    return ".".join(parts)


def resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ImportFrom names."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def spell(target: str, module: str, is_package: bool, relative: bool) -> str:
    """`target` as written from `module`: relative when the original import was."""
    if not relative:
        return target
    here = module.split(".") if is_package else module.split(".")[:-1]
    there = target.split(".")
    common = 0
    while common < min(len(here), len(there)) and here[common] == there[common]:
        common += 1
    if common == 0:
        return target
    return "." * (len(here) - common + 1) + ".".join(there[common:])


def render_import(spec: str, aliases: list[str], indent: str) -> str:
    """`from spec import aliases` as ruff formats it: one line, or one name a line."""
    line = f"{indent}from {spec} import {', '.join(aliases)}\n"
    if len(line) <= MAX_LINE:
        return line
    body = "".join(f"{indent}    {name},\n" for name in aliases)
    return f"{indent}from {spec} import (\n{body}{indent})\n"


def member_key(alias: str) -> tuple[int, str, str]:
    """ruff's order of imported names: CONSTANTS, then Classes, then the rest."""
    name = alias.split(" as ")[0]
    kind = 0 if name.isupper() and len(name) > 1 else 1 if name[:1].isupper() else 2
    return kind, name.lower(), alias


def statement_key(node: ast.stmt) -> tuple[int, int, str, str, str]:
    """ruff's order of the import statements of one section: `import x` before `from x`,
    relative ones furthest first, then by module name, then by the first name."""
    if isinstance(node, ast.Import):
        return 0, 0, node.names[0].name.lower(), node.names[0].name, ""
    assert isinstance(node, ast.ImportFrom)
    first = min((ast.unparse(alias) for alias in node.names), key=member_key)
    module = node.module or ""
    return 1, -node.level, module.lower(), module, member_key(first)[1]


def dotted(node: ast.ImportFrom) -> str:
    return "." * node.level + (node.module or "")


def import_block(body: list[ast.stmt], index: int, lines: list[str]) -> list[ast.stmt]:
    """body[index] and the module-level imports on the lines next to it, with no comment
    among them: one section, as ruff separates sections by a blank line."""

    def joined(a: ast.stmt, b: ast.stmt) -> bool:
        imports = (ast.Import, ast.ImportFrom)
        return (
            isinstance(a, imports)
            and isinstance(b, imports)
            and a.end_lineno == b.lineno - 1
            and "#" not in "".join(lines[a.lineno - 1 : b.end_lineno])
        )

    start = end = index
    while start > 0 and joined(body[start - 1], body[start]):
        start -= 1
    while end + 1 < len(body) and joined(body[end], body[end + 1]):
        end += 1
    return body[start : end + 1]


def rewrite_imports(path: Path, old: str, new: str, names: set[str]) -> bool:
    """Move imports of `names` from `old` to `new` in one file; True if it changed. The
    names join an import of `new` already in the same block, and the block is left in the
    order ruff sorts it in."""
    source = path.read_text()
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return False
    module, is_package = module_of(path), path.name == "__init__.py"
    lines = source.splitlines(keepends=True)

    def moves(node: ast.AST) -> bool:
        return (
            isinstance(node, ast.ImportFrom)
            and resolve(node, module, is_package) == old
            and any(alias.name in names for alias in node.names)
        )

    blocks: list[list[ast.stmt]] = []
    for index, node in enumerate(tree.body):
        if moves(node) and not any(node in block for block in blocks):
            blocks.append(import_block(tree.body, index, lines))
    # Imports inside functions or classes: a block of their own.
    blocks += [
        [node]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and moves(node) and node not in tree.body
    ]

    edits = []
    for block in blocks:
        indent = lines[block[0].lineno - 1][: block[0].col_offset]
        moved: list[str] = []
        relative = False
        joined: ast.ImportFrom | None = None
        out: list[tuple[tuple[int, int, str, str, str], str]] = []
        for node in block:
            text = "".join(lines[node.lineno - 1 : node.end_lineno])
            if isinstance(node, ast.ImportFrom) and moves(node):
                relative = relative or node.level > 0
                moved += [ast.unparse(alias) for alias in node.names if alias.name in names]
                node.names = [alias for alias in node.names if alias.name not in names]
                if not node.names:
                    continue
                text = render_import(dotted(node), [ast.unparse(a) for a in node.names], indent)
            elif (
                isinstance(node, ast.ImportFrom)
                and joined is None
                and resolve(node, module, is_package) == new
            ):
                joined = node
                continue
            out.append((statement_key(node), text))
        if joined is not None:
            moved += [ast.unparse(alias) for alias in joined.names]
            spec = dotted(joined)
        else:
            spec = spell(new, module, is_package, relative)
        aliases = sorted(dict.fromkeys(moved), key=member_key)
        statement = ast.parse(f"from {spec} import {', '.join(aliases)}").body[0]
        out.append((statement_key(statement), render_import(spec, aliases, indent)))
        out.sort(key=lambda item: item[0])
        end = block[-1].end_lineno or block[-1].lineno
        edits.append((block[0].lineno - 1, end, "".join(text for _, text in out)))
    for start, end, text in sorted(edits, reverse=True):
        lines[start:end] = [text]
    if edits:
        path.write_text("".join(lines))
    return bool(edits)


def move_imports(old: str, new: str, names: list[str]) -> str:
    changed = []
    for path in sorted(Path().rglob("*.py")):
        if SKIP_DIRS.intersection(path.parts):
            continue
        if rewrite_imports(path, old, new, set(names)):
            changed.append(str(path))
    if not changed:
        return f"no imports of {', '.join(names)} from {old}"
    return f"imports of {', '.join(names)} now come from {new} in: {', '.join(changed)}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    sub.add_parser("set-answer").add_argument("pair", nargs=2, metavar=("NAME", "VALUE"))
    for name in ("rename-answer", "move-file", "move-imports"):
        step = sub.add_parser(name)
        step.add_argument("old")
        step.add_argument("new")
        if name == "move-imports":
            step.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    if args.step == "set-answer":
        print(set_answer(*args.pair))
    elif args.step == "rename-answer":
        print(rename_answer(args.old, args.new))
    elif args.step == "move-file":
        print(move_file(args.old, args.new))
    else:
        print(move_imports(args.old, args.new, args.names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
