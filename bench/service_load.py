"""HTTP throughput and latency of the rendered service against reference apps.

Each case runs under uvicorn (1 worker, the rendered project's own environment) and is
loaded by wrk over loopback: a warm-up, then the measured run. Cases:

- the rendered service (with_example=true) for asyncpg, psycopg and aiosqlite, on
  `GET /items/{id}` and `POST /items`;
- optionally the rendered asyncpg service of an earlier template version (the baseline, by
  default the newest release in CHANGELOG.md), so that before and after share one run;
- reference (a), `bench/apps/raw_asyncpg.py`: the same endpoints on a bare asyncpg pool;
- reference (b), `bench/apps/sync_sqlalchemy.py`: a synchronous SQLAlchemy session on
  psycopg in FastAPI's thread pool;
- reference (c), `bench/apps/plain_sqlalchemy.py`: a plain async SQLAlchemy session on
  asyncpg, opened in the handler, with SQLAlchemy's defaults (the ORM's own floor);
- reference (d), `bench/apps/peer_template.py`: what other FastAPI templates render, a `yield`
  session dependency on SQLAlchemy's stock pool (5 + 10, pre-ping on), asyncpg, the commit in
  the POST handler;
- the rendered asyncpg service with SQLAlchemy's stock `AsyncAdaptedQueuePool` in place of the
  template's hand-over pool (`bench/apps/rendered_stock_pool.py`, the rendered code unedited):
  whether that pool earns its place;
- the rendered asyncpg service with one setting changed at a time (the knobs).

Besides requests per second and latency, each case reports the CPU time its service process
spent per request (`cpu_us`): what the service's own code costs, whatever wrk and PostgreSQL
take of the other core. It drifts with the machine's speed as the throughput does.

PostgreSQL cases also report the connections their service opened, from the server's own
counter (`pg_stat_database.sessions` of the bench database): `connections_opened` during the
measured run (read after the warm-up, and again once the service has stopped),
`connections_opened_warmup` from start-up to the end of the warm-up; and `connections_peak`,
the most client connections to the database open at once during the measured run
(`pg_stat_activity`, sampled every 50 ms, so a shorter peak can be missed). A server process
adds its session to the counter when it first goes idle, before its client can send a query,
and at exit; so the counts are exact whenever the server's statistics lock was free then
(PostgreSQL 15 skips a flush rather than wait for it, and retries within seconds).

The PostgreSQL cases share one database (created on the admin URL, migrated by the rendered
project's Alembic, seeded, dropped afterwards); SQLite uses a file in the work directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from harness.rendering import clean_env, render
from harness.services import (
    ConnectionSampler,
    Service,
    create_database,
    drop_database,
    migrate,
    run,
    with_database,
)

APPS_DIR = Path(__file__).resolve().parent / "apps"
SEED_ITEMS = 1000
DRIVERS = ("asyncpg", "psycopg", "aiosqlite")
# Every case runs with the same uvicorn options; access logging is left out of all of them.
UVICORN_ARGS = ("--no-access-log",)

# wrk's Lua hooks: GET picks a random seeded item; POST sends a new name each time (the
# column is unique). `done` prints the figures as one JSON line, in microseconds.
WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,"non_2xx":%d,"socket_errors":%d}\\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect + e.read + e.write + e.timeout))
end
"""
WRK_GET = """
request = function()
  return wrk.format("GET", "/items/" .. math.random(1, SEED_ITEMS))
end
""".replace("SEED_ITEMS", str(SEED_ITEMS))
WRK_POST = """
local n = 0
request = function()
  n = n + 1
  local body = '{"name":"TAG-' .. n .. '","price_cents":100}'
  return wrk.format("POST", "/items", {["Content-Type"] = "application/json"}, body)
end
"""


@dataclass
class Case:
    """One app under one configuration, loaded on one endpoint."""

    name: str
    group: str  # "rendered", "reference" or "knob"
    driver: str  # whose rendered environment runs it
    endpoint: str  # "GET /items/{id}" or "POST /items"
    app: str = "my_service.main:app"
    env: dict[str, str] = field(default_factory=dict)
    # The rendered project (and environment) it runs in, when not the driver's own.
    project: str | None = None


@dataclass
class Result:
    name: str
    group: str
    endpoint: str
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_us: float
    requests: int
    errors: int
    # PostgreSQL only (None on SQLite): see the module docstring.
    connections_opened: int | None
    connections_peak: int | None
    connections_opened_warmup: int | None


def wrk_script(endpoint: str, tag: str) -> str:
    body = WRK_GET if endpoint.startswith("GET") else WRK_POST.replace("TAG", tag)
    return body + WRK_DONE


def wrk(url: str, script: Path, seconds: int, connections: int) -> dict[str, int]:
    """One wrk run (one thread: the other core is the service's)."""
    cmd = [
        *("wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "10s"),
        *("-s", str(script), url),
    ]
    output = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 60)
    if output.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{output.stdout}{output.stderr}")
    line = next(ln for ln in output.stdout.splitlines() if ln.startswith('{"requests"'))
    figures: dict[str, int] = json.loads(line)
    return figures


def group_cpu_seconds(pgid: int) -> float:
    """User and system CPU time of every live process in process group `pgid`."""
    ticks = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # Fields after the command name (which may hold spaces): state is [0], the
            # process group [2], utime [11], stime [12].
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def sessions_opened(admin_url: str, database: str) -> int:
    """Connections ever established to `database` (the server's own counter)."""
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=5) as conn:
        conn.execute("SELECT pg_stat_force_next_flush()")
        row = conn.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = %s", (database,)
        ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


class Bench:
    """Renders the variants, prepares their databases and runs the cases."""

    def __init__(
        self,
        work: Path,
        admin_url: str,
        seconds: int,
        warmup: int,
        conc: int,
        baseline: tuple[str, str] | None = None,
        template_ref: str = "HEAD",
    ):
        self.work = work
        self.admin_url = admin_url
        self.seconds = seconds
        self.warmup = warmup
        self.connections = conc
        self.database = f"bench_{uuid.uuid4().hex[:8]}"
        self.pg_url = with_database(admin_url, self.database)
        self.sqlite_path = work / "bench.db"
        # (label, git revision) of the template version rendered for the baseline case.
        self.baseline = baseline
        # The revision rendered for the current services ("HEAD": the working tree).
        self.template_ref = template_ref
        self.roots: dict[str, Path] = {}

    def prepare(self) -> None:
        projects = {driver: (driver, self.template_ref) for driver in DRIVERS}
        if self.baseline is not None:
            label, revision = self.baseline
            projects[baseline_project(label)] = ("asyncpg", revision)
        for n, (project, (driver, revision)) in enumerate(projects.items()):
            root = render(
                self.work / f"project-{n}", vcs_ref=revision, db_driver=driver, with_example=True
            )
            run(["uv", "sync", "--quiet", "--no-dev"], root, clean_env())
            self.roots[project] = root
        create_database(self.admin_url, self.database)
        migrate(self.roots["asyncpg"], self.pg_url)
        migrate(self.roots["aiosqlite"], self.url("aiosqlite"))
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO items (name, price_cents) "
                "SELECT 'seed-' || g, g FROM generate_series(1, %s) AS g",
                (SEED_ITEMS,),
            )
        with sqlite3.connect(self.sqlite_path) as conn:
            conn.executemany(
                "INSERT INTO items (name, price_cents) VALUES (?, ?)",
                [(f"seed-{i}", i) for i in range(1, SEED_ITEMS + 1)],
            )

    def cleanup(self) -> None:
        drop_database(self.admin_url, self.database)

    def url(self, driver: str) -> str:
        if driver == "aiosqlite":
            return f"sqlite:///{self.sqlite_path}"
        return self.pg_url

    def measure(self, case: Case) -> Result:
        root = self.roots[case.project or case.driver]
        database_url = self.url(case.driver)
        env = {"DATABASE_URL": database_url}
        env.update({k: v.replace(DATABASE_URL_MARK, database_url) for k, v in case.env.items()})
        if case.app != "my_service.main:app":
            env["PYTHONPATH"] = str(APPS_DIR)
        slug = case.name.replace(" ", "_").replace(",", "").replace("/", "_")
        tag = f"{slug}-{uuid.uuid4().hex[:6]}"
        # Warm-up and measured run each send their own names.
        warm, measured = self.work / f"{tag}-warm.lua", self.work / f"{tag}.lua"
        warm.write_text(wrk_script(case.endpoint, f"{tag}-warm"))
        measured.write_text(wrk_script(case.endpoint, tag))
        is_pg = case.driver != "aiosqlite"
        at_start = sessions_opened(self.admin_url, self.database) if is_pg else 0
        before = at_start
        peak: int | None = None
        service = Service(
            root, self.work / f"{tag}.log", app=case.app, uvicorn_args=UVICORN_ARGS, **env
        )
        service.start()
        try:
            path = "/items/1" if case.endpoint.startswith("GET") else "/items"
            url = service.base_url + path
            wrk(url, warm, self.warmup, self.connections)
            assert service.proc is not None
            sampler = None
            if is_pg:
                before = sessions_opened(self.admin_url, self.database)
                sampler = ConnectionSampler(self.admin_url, self.database, interval=0.05)
                sampler.start()
            cpu_before = group_cpu_seconds(service.proc.pid)
            try:
                figures = wrk(url, measured, self.seconds, self.connections)
                cpu = group_cpu_seconds(service.proc.pid) - cpu_before
            finally:
                if sampler is not None:
                    peak = max(sampler.finish(), default=0)
        finally:
            service.stop()
        # Read once the service has stopped: every one of its sessions has ended, and a server
        # process reports its session at exit at the latest.
        after = sessions_opened(self.admin_url, self.database) if is_pg else 0
        return Result(
            name=case.name,
            group=case.group,
            endpoint=case.endpoint,
            rps=round(figures["requests"] / (figures["duration_us"] / 1e6), 1),
            p50_ms=round(figures["p50_us"] / 1000, 2),
            p99_ms=round(figures["p99_us"] / 1000, 2),
            cpu_us=round(cpu * 1e6 / max(figures["requests"], 1), 1),
            requests=figures["requests"],
            errors=figures["non_2xx"] + figures["socket_errors"],
            connections_opened=after - before if is_pg else None,
            connections_peak=peak,
            connections_opened_warmup=before - at_start if is_pg else None,
        )


RAW = "(a) raw asyncpg"
SYNC = "(b) sync SQLAlchemy + psycopg"
PLAIN = "(c) plain async SQLAlchemy"
PEER = "(d) peer template session"
STOCK_POOL = "rendered asyncpg, stock pool"
# Reference columns of the ratios table, in order.
REFERENCES = (
    ("vs_raw_asyncpg", RAW),
    ("vs_sync_sqlalchemy", SYNC),
    ("vs_plain_sqlalchemy", PLAIN),
    ("vs_peer_template", PEER),
)
# A knob's environment may name the case's own database URL.
DATABASE_URL_MARK = "$DATABASE_URL"


def baseline_project(label: str) -> str:
    return f"asyncpg@{label}"


def cases(baseline: str | None = None) -> list[Case]:
    """Every case; `baseline` labels the earlier template version, if one is rendered."""
    endpoints = ("GET /items/{id}", "POST /items")
    found: list[Case] = []
    for endpoint in endpoints:
        for driver in DRIVERS:
            found.append(Case(f"rendered {driver}", "rendered", driver, endpoint))
        if baseline is not None:
            found.append(
                Case(
                    f"rendered asyncpg @{baseline}",
                    "baseline",
                    "asyncpg",
                    endpoint,
                    project=baseline_project(baseline),
                )
            )
        found.append(Case(RAW, "reference", "asyncpg", endpoint, app="raw_asyncpg:app"))
        found.append(Case(SYNC, "reference", "psycopg", endpoint, app="sync_sqlalchemy:app"))
        found.append(Case(PLAIN, "reference", "asyncpg", endpoint, app="plain_sqlalchemy:app"))
        found.append(Case(PEER, "reference", "asyncpg", endpoint, app="peer_template:app"))
        found.append(Case(STOCK_POOL, "pool", "asyncpg", endpoint, app="rendered_stock_pool:app"))
    knobs = {
        "pre_ping off": {"DB_POOL_PRE_PING": "false"},
        "statement timeout off": {"DB_STATEMENT_TIMEOUT": "0"},
        "slow-query log off": {"DB_SLOW_QUERY_MS": "0"},
        "echo on": {"DB_ECHO": "true"},
        "pool size 20": {"DB_POOL_SIZE": "20"},
        # Reads get a pool of their own, read-only at the server, without BEGIN/COMMIT.
        "DATABASE_READ_URL set": {"DATABASE_READ_URL": DATABASE_URL_MARK},
    }
    for label, env in knobs.items():
        found.append(Case(f"asyncpg, {label}", "knob", "asyncpg", endpoints[0], env=env))
    found.append(
        Case("asyncpg, pool size 20", "knob", "asyncpg", endpoints[1], env=knobs["pool size 20"])
    )
    return found


def median_result(runs: list[Result]) -> Result:
    """One row for a case's rounds: the median of each figure; errors summed over rounds, and
    for connections the most of any round."""
    first = runs[0]

    def most(figure: str) -> int | None:
        values = [getattr(r, figure) for r in runs if getattr(r, figure) is not None]
        return max(values) if values else None

    return Result(
        name=first.name,
        group=first.group,
        endpoint=first.endpoint,
        rps=round(statistics.median(r.rps for r in runs), 1),
        p50_ms=round(statistics.median(r.p50_ms for r in runs), 2),
        p99_ms=round(statistics.median(r.p99_ms for r in runs), 2),
        cpu_us=round(statistics.median(r.cpu_us for r in runs), 1),
        requests=sum(r.requests for r in runs),
        errors=sum(r.errors for r in runs),
        connections_opened=most("connections_opened"),
        connections_peak=most("connections_peak"),
        connections_opened_warmup=most("connections_opened_warmup"),
    )


def spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


DEFAULT = "rendered asyncpg"
# One round: each case's result, with the default service's result measured just before it.
Round = dict[tuple[str, str], tuple[Result, Result]]


def relative(pair: tuple[Result, Result], figure: str = "rps") -> float:
    """A result's figure as a multiple of its adjacent default run's."""
    result, default = pair
    return float(getattr(result, figure)) / float(getattr(default, figure))


def ratios(rounds: list[Round]) -> list[dict[str, Any]]:
    """Each rendered service's throughput as a multiple of each reference's. Both are taken
    relative to the default service measured just before them, within seconds, so a change
    in the machine's speed between the two runs cancels out: (X / dX) / (R / dR). A reference
    left out of the run (--only) has no column."""
    rows = []
    for key, (result, _) in rounds[0].items():
        name, endpoint = key
        if result.group not in ("rendered", "baseline"):
            continue
        row: dict[str, Any] = {"name": name, "endpoint": endpoint}
        for column, reference in REFERENCES:
            if (reference, endpoint) not in rounds[0]:
                continue
            row[column] = spread(
                [relative(r[key]) / relative(r[(reference, endpoint)]) for r in rounds]
            )
        rows.append(row)
    return rows


def count_spread(values: list[int]) -> dict[str, float]:
    """Median, smallest and largest of counts; whole numbers stay whole."""
    median = statistics.median(values)
    return {
        "median": int(median) if float(median).is_integer() else median,
        "min": min(values),
        "max": max(values),
    }


def against_default(rounds: list[Round], group: str) -> list[dict[str, Any]]:
    """Each case of `group` against the default service measured just before it: throughput,
    CPU per request and p99 latency as multiples of the default's; the connections each
    opened during the measured run side by side (PostgreSQL cases)."""
    rows = []
    for key, (result, _) in rounds[0].items():
        if result.group != group:
            continue
        row: dict[str, Any] = {
            "name": key[0],
            "endpoint": key[1],
            "rps_vs_default": spread([relative(r[key]) for r in rounds]),
            "cpu_vs_default": spread([relative(r[key], "cpu_us") for r in rounds]),
            "p99_vs_default": spread([relative(r[key], "p99_ms") for r in rounds]),
        }
        if result.connections_opened is not None:
            for column, index in (("connections_opened", 0), ("default_connections_opened", 1)):
                row[column] = count_spread([r[key][index].connections_opened or 0 for r in rounds])
        rows.append(row)
    return rows


def run_all(
    work: Path,
    admin_url: str,
    seconds: int = 6,
    warmup: int = 2,
    connections: int = 64,
    rounds: int = 3,
    only: list[str] | None = None,
    baseline: tuple[str, str] | None = None,
    template_ref: str = "HEAD",
) -> dict[str, Any]:
    """Every case (or those whose name contains one of `only`) `rounds` times, each round in
    its own shuffled order, each case right after a run of the default service (rendered
    asyncpg, same endpoint), which therefore runs whatever the selection.

    The speed of a shared machine drifts over minutes, by a third and more. Comparisons are
    made against the adjacent default run (see ratios), and reported as the median over the
    rounds with the smallest and largest value; each case's own figures are the medians of
    its rounds.
    """
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk (or run bench/run)")
    label = baseline[0] if baseline is not None else None
    all_cases = cases(label)
    defaults = {c.endpoint: c for c in all_cases if c.name == DEFAULT}
    selected = [c for c in all_cases if not only or any(text in c.name for text in only)]
    if not selected:
        raise SystemExit(f"no load case matches --only {only}")
    bench = Bench(work, admin_url, seconds, warmup, connections, baseline, template_ref)

    def measure(case: Case, round_no: int) -> Result:
        started = time.perf_counter()
        result = bench.measure(case)
        print(
            f"  [{round_no}/{rounds}] {case.endpoint:16} {case.name:30} "
            f"{result.rps:8.1f} req/s  p50 {result.p50_ms:6.2f} ms  "
            f"p99 {result.p99_ms:7.2f} ms  cpu {result.cpu_us:6.0f} us/req  "
            f"errors {result.errors}  ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        return result

    by_round: list[Round] = []
    default_runs: dict[str, list[Result]] = {endpoint: [] for endpoint in defaults}
    try:
        # Inside the try: a failed render or migration still drops the database.
        bench.prepare()
        for round_no in range(1, rounds + 1):
            order = [c for c in selected if c.name != DEFAULT]
            # Seeded: every run of the benchmark takes the cases in the same orders.
            random.Random(round_no).shuffle(order)
            measured: Round = {}
            for case in order:
                default = measure(defaults[case.endpoint], round_no)
                default_runs[case.endpoint].append(default)
                measured[(case.name, case.endpoint)] = (measure(case, round_no), default)
            for endpoint in defaults:
                # The default against itself (a ratio of 1): against a reference R its ratio
                # is then dR / R, with R's adjacent default run. It ran in every selection.
                runs = [d for (_, e), (_, d) in measured.items() if e == endpoint]
                if runs:
                    measured[(DEFAULT, endpoint)] = (runs[0], runs[0])
            # Rows in the order of cases(), whatever order they ran in.
            by_round.append(
                {
                    (c.name, c.endpoint): measured[(c.name, c.endpoint)]
                    for c in all_cases
                    if (c.name, c.endpoint) in measured
                }
            )
    finally:
        bench.cleanup()
    results = []
    for key in by_round[0]:
        name, endpoint = key
        runs = default_runs[endpoint] if name == DEFAULT else [r[key][0] for r in by_round]
        results.append(median_result(runs))
    return {
        "concurrency": connections,
        "seconds": seconds,
        "rounds": rounds,
        "only": only,
        "results": [asdict(r) for r in results],
        "ratios": ratios(by_round),
        "pool": against_default(by_round, "pool"),
        "knobs": against_default(by_round, "knob"),
        "all_rounds": [
            [
                {
                    **asdict(result),
                    "default_rps": default.rps,
                    "default_p99_ms": default.p99_ms,
                    "default_cpu_us": default.cpu_us,
                    "default_connections_opened": default.connections_opened,
                }
                for result, default in r.values()
            ]
            for r in by_round
        ],
    }
