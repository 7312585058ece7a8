"""Run every benchmark, print the tables and write the figures as JSON.

    bench/run [--out FILE] [--seconds N] [--warmup N] [--rounds N] [--tests N]
              [--baseline REV|release|none] [--template REV] [--no-matrix]
              [--only TEXT [--only TEXT ...]]

HTTP load: the rendered services, references (a)-(d+), the rendered asyncpg service on other
pools and with SQLAlchemy's pre-ping, and the knobs, each paired with a run of the default
service; then per-test isolation and template operations (skipped with --only). See bench/README.md.

Not part of the test suite: nothing here passes or fails on a figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import fixture_overhead, service_load, template_ops
from bench.report import table
from harness.rendering import REPO_ROOT
from harness.updates import previous_release

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "latest.json"


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "wrk": (wrk.stdout + wrk.stderr).split("\n", 1)[0].strip(),
        "commit": subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Load cases (for --only, any part of a name): rendered asyncpg | psycopg | "
        "aiosqlite, rendered asyncpg @<baseline>, (a) raw asyncpg, (b) sync SQLAlchemy + "
        "psycopg, (c) plain async SQLAlchemy, (d) peer template session, (d+) equipped peer, "
        "pool (ii) | (iii) | (iv) ..., SQLAlchemy pool_pre_ping, the knobs 'asyncpg, "
        "<setting>', the tracing cases and 'layer: <layer>'. Words that select groups: "
        "references ((a)-(d+)), peers ((a), (d), (d+)), pools ((ii)-(iv)), pre-ping, knobs, "
        "baseline, layers (the six layers and (a)). Example: bench/run --rounds 3 "
        "--baseline none --only peers --only pools --only pre-ping",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    parser.add_argument("--seconds", type=int, default=6, help="measured seconds per load run")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up seconds per load run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every load case")
    parser.add_argument("--tests", type=int, default=300, help="tiny tests per fixture case")
    parser.add_argument("--no-matrix", action="store_true", help="skip the variant matrix")
    parser.add_argument(
        "--only",
        action="append",
        metavar="TEXT",
        help="run only the load cases whose name contains TEXT, or the group TEXT names (see "
        "below; repeat for several; the default service runs anyway, paired with each), and "
        "skip the other benchmarks",
    )
    parser.add_argument(
        "--baseline",
        default="release",
        help="template revision whose rendered asyncpg service is loaded too, for before and "
        "after in one run: a git revision, 'release' (the newest in CHANGELOG.md, the "
        "default) or 'none'",
    )
    parser.add_argument(
        "--template",
        default="HEAD",
        metavar="REV",
        help="template revision rendered for the current services: 'HEAD' (the default) is "
        "the working tree with its uncommitted changes; a commit, e.g. $(git rev-parse HEAD), "
        "renders that commit alone",
    )
    args = parser.parse_args()
    baseline: tuple[str, str] | None
    if args.baseline == "none":
        baseline = None
    elif args.baseline == "release":
        baseline = previous_release()
    else:
        baseline = (args.baseline, args.baseline)
    admin_url = os.environ.get("TEST_DATABASE_URL", DEFAULT_ADMIN_URL)
    started = time.perf_counter()
    load_at_start = round(os.getloadavg()[0], 2)
    figures: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": "bench/run " + " ".join(sys.argv[1:]),
        # The template revision rendered for the current services ("HEAD": the working tree).
        "template": args.template,
        "machine": machine(),
    }
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        work = Path(tmp)
        for part in ("load", "fixtures", "template"):
            (work / part).mkdir()
        print("HTTP load (wrk, 1 uvicorn worker, concurrency 64):", flush=True)
        figures["http"] = service_load.run_all(
            work / "load",
            admin_url,
            args.seconds,
            args.warmup,
            rounds=args.rounds,
            only=args.only,
            baseline=baseline,
            template_ref=args.template,
        )
        if args.only is None:
            print("\nPer-test isolation overhead:", flush=True)
            figures["fixtures"] = fixture_overhead.run(work / "fixtures", n_tests=args.tests)
            print("\nTemplate operations:", flush=True)
            figures["template"] = template_ops.run(work / "template", matrix=not args.no_matrix)
    figures["wall_s"] = round(time.perf_counter() - started, 1)
    # Other work on a shared machine moves every figure: its load before and after.
    figures["load_average_1m"] = {"start": load_at_start, "end": round(os.getloadavg()[0], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")

    if "http" in figures:
        print_load(figures["http"])
    if "fixtures" in figures:
        print("\n== Per-test isolation overhead")
        print(table(figures["fixtures"]))
        print("\n== Template operations (seconds)")
        print(table(figures["template"]))
    print(f"\nwritten: {args.out} ({figures['wall_s']} s in all)")


def print_load(load: dict[str, Any]) -> None:
    print(
        f"\n== HTTP load: {load['concurrency']} connections, {load['seconds']} s per run, "
        f"median of {load['rounds']} rounds; cpu_us: service CPU time per request; "
        "connections: opened by the service during the measured run, most open at once "
        "(sampled), opened from start-up to the end of the warm-up (most of any round)"
    )
    print(table(load["results"]))
    if load["ratios"]:
        print("\n== Rendered service / reference, requests per second: median (min-max) of rounds")
        print(table(load["ratios"]))
    if load["targets"]:
        print(
            "\n== Targets: rendered asyncpg (default) / the peer reference, each ratio against "
            "the default run adjacent to the reference's: median (min-max) of rounds; rendered "
            "and reference: the medians of the same runs"
        )
        print(table(load["targets"]))
    if load["pool"]:
        print(
            "\n== Pools under the rendered asyncpg service: (i) as rendered (all its runs), the "
            "others also as multiples of the adjacent default run; connections opened in the "
            "measured run: median (min-max) of rounds"
        )
        print(table(load["pool"]))
    if load["pre_ping"]:
        print(
            "\n== SQLAlchemy's pool_pre_ping instead of the service's checkout check / rendered "
            "asyncpg with defaults: median (min-max) of rounds"
        )
        print(table(load["pre_ping"]))
    if load["knobs"]:
        print("\n== Knobs / rendered asyncpg with defaults: median (min-max) of rounds")
        print(table(load["knobs"]))
    if load["tracing"]:
        sink = load["otlp_sink"]
        print(
            "\n== Tracing (rendered with tracing=true) / rendered asyncpg with defaults (no "
            f"tracing rendered): median (min-max) of rounds; the OTLP sink took {sink['exports']} "
            f"exports, {sink['bytes']} bytes"
        )
        print(table(load["tracing"]))
    if load["layers"]:
        print(
            "\n== The rendered service layer by layer (bench/apps/layers.py): req/s and service "
            "CPU per request, medians of rounds; added_cpu_us: what the layer adds to the one "
            "above it; (a), the raw-driver app, is the limit"
        )
        print(table(load["layers"]))


if __name__ == "__main__":
    main()
