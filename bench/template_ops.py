"""Wall-clock time of the template's own operations, each through the copier CLI in a subprocess.

Cases:

- `copier copy --trust --defaults --vcs-ref HEAD` of this checkout (working tree, uncommitted
  changes included), as the README runs it with `uvx --with copier-template-extensions`, the
  same with `uvx --offline` (uv revalidates its index cache with PyPI on every online run), and
  with the `copier` executable of this repository's own environment;
- `copier update --trust --defaults` (this repository's `copier`) of a service rendered from a
  throwaway template repository at 1.0.0 to a 2.0.0 that changes `README.md`, and a no-op
  update of the same service once it is at 2.0.0. The service is reset with git between runs;
- optionally, the template's variant matrix (`tests/test_variants.py` under the repository's
  pytest options, pytest-xdist `-n auto`): every variant rendered, synced, linted, type-checked
  and tested against PostgreSQL. One run.

Every copier case runs once unmeasured first (uv's tool environment cached, bytecode compiled),
then its measured runs interleaved with those of the cases it is compared with, so a change in
machine load falls on all of them. Python's bytecode cache goes to the work directory
(PYTHONPYCACHEPREFIX), so the figures are those of a warm machine even where the environment
sets PYTHONDONTWRITEBYTECODE or the virtualenvs hold no compiled bytecode. Each case reports its
number of runs, the minimum and the median, in seconds.
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness.rendering import REPO_ROOT, clean_env
from harness.updates import GIT_IDENTITY, TemplateRepo, commit_all, copy_service, git

COPY_RUNS = 5
UPDATE_RUNS = 5
UVX_COPIER = ("--with", "copier-template-extensions", "copier")
COPY_ARGS = ("copy", "--trust", "--defaults", "--vcs-ref", "HEAD")
UPDATE_ARGS = ("update", "--trust", "--defaults")
MATRIX_CMD = ("uv", "run", "pytest", "tests/test_variants.py", "-q", "-p", "no:cacheprovider")
# The 2.0.0 change: one line at the end of the rendered README.
README_MARK = "Benchmark line added in template 2.0.0."

Row = dict[str, object]


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    """Seconds `cmd` takes; a failure raises with the tail of its output."""
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        output = result.stdout + result.stderr
        raise RuntimeError(
            f"{' '.join(cmd)} failed (exit {result.returncode}) in {cwd}:\n{output[-6000:]}"
        )
    return elapsed


def row(case: str, times: list[float]) -> Row:
    return {
        "case": case,
        "runs": len(times),
        "min_s": round(min(times), 3),
        "median_s": round(statistics.median(times), 3),
    }


def copier_env(work: Path, **extra: str) -> dict[str, str]:
    """clean_env() with Python's bytecode written to, and read from, the work directory."""
    return clean_env(PYTHONDONTWRITEBYTECODE="", PYTHONPYCACHEPREFIX=str(work / "pycache"), **extra)


def repo_copier() -> str:
    """The `copier` of the environment running this module (the repository's .venv)."""
    path = Path(sys.prefix) / "bin" / "copier"
    if not path.exists():
        raise RuntimeError(f"{path} not found; run this module with `uv run` from the repo root")
    return str(path)


def copy_rows(work: Path) -> list[Row]:
    uvx = shutil.which("uvx")
    if uvx is None:
        raise RuntimeError("uvx not found on PATH")
    env = copier_env(work)
    clis = {
        "copier copy (CLI, uvx, as in README)": [uvx, *UVX_COPIER],
        "copier copy (CLI, uvx --offline)": [uvx, "--offline", *UVX_COPIER],
        "copier copy (CLI, repo env)": [repo_copier()],
    }
    times: dict[str, list[float]] = {case: [] for case in clis}
    # Round 0 is the warm-up and is not counted.
    for i in range(COPY_RUNS + 1):
        for n, (case, cli) in enumerate(clis.items()):
            dst = work / "copy" / f"{n}-{i}"
            elapsed = timed([*cli, *COPY_ARGS, str(REPO_ROOT), str(dst)], work, env)
            if not (dst / ".copier-answers.yml").is_file():
                raise RuntimeError(f"{case}: {dst} has no .copier-answers.yml")
            if i:
                times[case].append(elapsed)
    return [row(case, t) for case, t in times.items()]


def reset(service: Path, commit: str) -> None:
    git(service, "reset", "-q", "--hard", commit)
    git(service, "clean", "-q", "-fdx")


def update_rows(work: Path) -> list[Row]:
    # A template repository with 1.0.0 (this working tree) and 2.0.0 (one README line more).
    template = TemplateRepo(work / "template-repo")
    template.load_working_tree()
    template.release("1.0.0")
    service = copy_service(template.path, work / "update" / "service", "1.0.0")
    at_1 = git(service, "rev-parse", "HEAD").strip()
    template.append("template/README.md.jinja", f"\n{README_MARK}\n")
    template.release("2.0.0")

    cmd = [repo_copier(), *UPDATE_ARGS]
    env = copier_env(work, **GIT_IDENTITY)

    def real_update() -> float:
        reset(service, at_1)
        elapsed = timed(cmd, service, env)
        answers = (service / ".copier-answers.yml").read_text()
        if (
            README_MARK not in (service / "README.md").read_text()
            or "_commit: 2.0.0" not in answers
        ):
            raise RuntimeError(f"copier update did not bring {service} to 2.0.0")
        return elapsed

    # The updated service, committed: the state a further (no-op) update starts from.
    real_update()
    commit_all(service, "updated to 2.0.0")
    at_2 = git(service, "rev-parse", "HEAD").strip()

    def noop_update() -> float:
        reset(service, at_2)
        elapsed = timed(cmd, service, env)
        changed = git(service, "status", "--porcelain")
        if changed:
            raise RuntimeError(f"no-op copier update changed {service}:\n{changed}")
        return elapsed

    noop_update()  # warm-up
    real, noop = [], []
    for _ in range(UPDATE_RUNS):
        real.append(real_update())
        noop.append(noop_update())
    return [
        row("copier update 1.0.0 -> 2.0.0 (CLI, repo env)", real),
        row("copier update, no-op at 2.0.0 (CLI, repo env)", noop),
    ]


def matrix_row() -> Row:
    start = time.perf_counter()
    result = subprocess.run(
        list(MATRIX_CMD), cwd=REPO_ROOT, env=clean_env(), capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(MATRIX_CMD)} failed (exit {result.returncode}):\n{output[-6000:]}"
        )
    summaries = [line.strip("= ") for line in output.splitlines() if re.search(r"\d+ passed", line)]
    if not summaries:
        raise RuntimeError(f"no pytest summary line in:\n{output[-6000:]}")
    return {
        **row("variant matrix (tests/test_variants.py, -n auto)", [elapsed]),
        "summary": summaries[-1],
    }


def run(work: Path, matrix: bool = True) -> list[Row]:
    """Every case, with scratch files under `work`."""
    rows = [*copy_rows(work), *update_rows(work)]
    if matrix:
        rows.append(matrix_row())
    return rows
