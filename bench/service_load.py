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
- reference (d+), `bench/apps/peer_equipped.py`: (d) with what its user adds for the rendered
  service's request id and request metrics (asgi-correlation-id's middleware and
  prometheus-fastapi-instrumentator with its defaults; both installed into the references'
  environment, REFERENCE_EXTRAS);
- the pool cases, the rendered asyncpg service unedited on other pools
  (`bench/apps/rendered_pool.py`): (i) as rendered is the default service itself; (ii)
  SQLAlchemy's `AsyncAdaptedQueuePool` at 15 + 0, so that it never closes a connection for
  being beyond its size; (iii) the same pool at 5 + 10; (iv) the template's hand-over pool
  from the bench's own copy (`bench/apps/handover_pool.py`) at 5 + 10;
- the pre-ping case: the rendered asyncpg service with SQLAlchemy's `pool_pre_ping` (a round
  trip on every checkout) in place of its own checkout check (DB_POOL_PRE_PING=false);
- the rendered asyncpg service with one setting changed at a time (the knobs);
- the tracing cases: the asyncpg service rendered with `tracing=true` and no
  OTEL_EXPORTER_OTLP_ENDPOINT (nothing traced), with an endpoint and the sampler
  `always_off` (spans made for none), and with `always_on` (every span made and sent), to a
  sink in the bench process that answers every export with 200 (what a collector's receiver
  does, without its processing); and `always_on` to a collector that never answers (a
  listening socket nothing accepts from). Against the default service, which renders no
  tracing.

Every rendered service runs as `uvicorn --factory <package>.main:create_app` (or the factory
of `bench/apps/rendered_pool.py` around it); the reference apps as `module:app`.

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
project's Alembic, seeded, dropped afterwards); SQLite uses a file in the work directory. Only
the projects that the selected cases run in are rendered.

The targets table sets the rendered asyncpg service against (d) and (d+), each comparison
within the round and against the default run adjacent to the reference's (see ratios).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import sqlite3
import statistics
import subprocess
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
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
# The rendered service's application factory (uvicorn --factory).
RENDERED_FACTORY = "my_service.main:create_app"
# What reference (d+) needs beyond the rendered asyncpg project's own dependencies, installed
# into that project's environment, where the references on asyncpg run.
REFERENCE_EXTRAS = ("prometheus-fastapi-instrumentator", "asgi-correlation-id")

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
    group: str  # "rendered", "baseline", "reference", "pool", "pre-ping", "knob" or "tracing"
    driver: str  # whose rendered environment runs it
    endpoint: str  # "GET /items/{id}" or "POST /items"
    # `module:factory` for uvicorn --factory, or `module:app` when `factory` is false.
    app: str = RENDERED_FACTORY
    factory: bool = True
    env: dict[str, str] = field(default_factory=dict)
    # The rendered project (and environment) it runs in, when not the driver's own.
    project: str | None = None
    # Words that select the case with --only, besides any part of its name.
    tags: tuple[str, ...] = ()

    def selected_by(self, text: str) -> bool:
        return text in self.tags or text in self.name


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


def install_reference_extras(root: Path) -> None:
    """Install REFERENCE_EXTRAS into the environment of the rendered project at `root`, which
    the rendered service shares with the references; fails if that would change any package
    already there, so the service runs on what its own `pyproject.toml` installed."""
    python = root / ".venv" / "bin" / "python"
    output = run(
        ["uv", "pip", "install", "--python", str(python), *REFERENCE_EXTRAS], root, clean_env()
    )
    changed = [line.strip() for line in output.splitlines() if line.startswith(" - ")]
    if changed:
        raise RuntimeError(
            f"installing {', '.join(REFERENCE_EXTRAS)} changed the rendered service's "
            f"environment ({', '.join(changed)}): give the references an environment of their own"
        )


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
        # The OTLP sink of the tracing cases.
        self.sink = ThreadingHTTPServer(("127.0.0.1", 0), Sink)
        self.sink_port = self.sink.server_address[1]
        threading.Thread(target=self.sink.serve_forever, daemon=True).start()
        # A collector that takes connections and never answers (one behind a dropping
        # firewall): nothing accepts them, and the kernel's backlog holds the first.
        self.silent = socket.create_server(("127.0.0.1", 0), backlog=1)

    def prepare(self, cases: list[Case]) -> None:
        """Render and install the projects `cases` run in (the asyncpg one always: the default
        service's), and prepare their databases."""
        needed = {"asyncpg", *(c.project or c.driver for c in cases)}
        projects = {driver: (driver, self.template_ref) for driver in DRIVERS if driver in needed}
        if TRACING_PROJECT in needed:
            projects[TRACING_PROJECT] = ("asyncpg", self.template_ref)
        if self.baseline is not None and baseline_project(self.baseline[0]) in needed:
            label, revision = self.baseline
            projects[baseline_project(label)] = ("asyncpg", revision)
        for n, (project, (driver, revision)) in enumerate(projects.items()):
            # Only the tracing project is given the answer: earlier releases have no such question.
            extra: dict[str, Any] = {"tracing": True} if project == TRACING_PROJECT else {}
            root = render(
                self.work / f"project-{n}",
                vcs_ref=revision,
                db_driver=driver,
                with_example=True,
                **extra,
            )
            run(["uv", "sync", "--quiet", "--no-dev"], root, clean_env())
            self.roots[project] = root
        install_reference_extras(self.roots["asyncpg"])
        create_database(self.admin_url, self.database)
        migrate(self.roots["asyncpg"], self.pg_url)
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            conn.execute(
                "INSERT INTO items (name, price_cents) "
                "SELECT 'seed-' || g, g FROM generate_series(1, %s) AS g",
                (SEED_ITEMS,),
            )
        if "aiosqlite" in self.roots:
            migrate(self.roots["aiosqlite"], self.url("aiosqlite"))
            with sqlite3.connect(self.sqlite_path) as conn:
                conn.executemany(
                    "INSERT INTO items (name, price_cents) VALUES (?, ?)",
                    [(f"seed-{i}", i) for i in range(1, SEED_ITEMS + 1)],
                )

    def cleanup(self) -> None:
        self.sink.shutdown()
        self.silent.close()
        drop_database(self.admin_url, self.database)

    def url(self, driver: str) -> str:
        if driver == "aiosqlite":
            return f"sqlite:///{self.sqlite_path}"
        return self.pg_url

    def measure(self, case: Case) -> Result:
        root = self.roots[case.project or case.driver]
        database_url = self.url(case.driver)
        env = {"DATABASE_URL": database_url}
        ports = {"port": self.sink_port, "silent": self.silent.getsockname()[1]}
        env.update({name: value.format(**ports) for name, value in case.env.items()})
        if not case.app.startswith("my_service."):
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
        uvicorn_args = ("--factory", *UVICORN_ARGS) if case.factory else UVICORN_ARGS
        service = Service(root, self.work / f"{tag}.log", app=case.app, uvicorn_args=uvicorn_args)
        # The environment after the fact: Service(**env) would let a key named like one of its
        # other parameters through (and mypy rejects it for that).
        service.env.update(env)
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
EQUIPPED = "(d+) equipped peer"
# Reference columns of the ratios table, in order.
REFERENCES = (
    ("vs_raw_asyncpg", RAW),
    ("vs_sync_sqlalchemy", SYNC),
    ("vs_plain_sqlalchemy", PLAIN),
    ("vs_peer_template", PEER),
    ("vs_equipped_peer", EQUIPPED),
)
# The pool cases beside (i), the default service as rendered (SQLAlchemy's pool, 15 + 0,
# with sessions taking turns in the order they asked): name and BENCH_POOL_CASE. Each runs
# with DB_POOL_SIZE=1000, so that the service's turns never make a session wait and the pool
# the case sets up is all there is.
POOL_AS_RENDERED = "pool (i) as rendered"
POOL_CASES = (
    ("pool (ii) stock, 15 + 0, no turns", "stock-15-0"),
    ("pool (iii) stock, 5 + 10, no turns", "stock-5-10"),
    ("pool (iv) hand-over copy, 5 + 10, no turns", "handover-5-10"),
)
NO_TURNS = {"DB_POOL_SIZE": "1000", "DB_MAX_OVERFLOW": "0"}
PRE_PING = "SQLAlchemy pool_pre_ping"
# rendered_pool.py builds the rendered service through its factory, on another pool.
RENDERED_POOL_APP = "rendered_pool:create_app"
# The rendered service one layer at a time (apps/layers.py), in the order each adds to the last.
LAYERS_APP = "layers:create_app"
LAYERS = ("framework", "middlewares", "checkout", "statement", "orm", "service")
# The project rendered with tracing=true, and the OTLP sink's address in the cases' variables.
TRACING_PROJECT = "asyncpg+tracing"
SINK = "http://127.0.0.1:{port}"
SILENT = "http://127.0.0.1:{silent}"


class Sink(BaseHTTPRequestHandler):
    """Takes every OTLP/HTTP export and answers 200 with an empty (valid) protobuf response;
    counts the exports and their bytes."""

    exports = 0
    received = 0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Sink.exports += 1
        Sink.received += len(body)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def baseline_project(label: str) -> str:
    return f"asyncpg@{label}"


def cases(baseline: str | None = None) -> list[Case]:
    """Every case; `baseline` labels the earlier template version, if one is rendered."""
    endpoints = ("GET /items/{id}", "POST /items")
    found: list[Case] = []
    references = ("references",)
    peers = ("references", "peers")
    # The raw-driver app is the limit of the per-layer table, and a peer of the targets.
    raw = ("references", "peers", "layers")
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
                    tags=("baseline",),
                )
            )
        for name, driver, app, tags in (
            (RAW, "asyncpg", "raw_asyncpg:app", raw),
            (SYNC, "psycopg", "sync_sqlalchemy:app", references),
            (PLAIN, "asyncpg", "plain_sqlalchemy:app", references),
            (PEER, "asyncpg", "peer_template:app", peers),
            (EQUIPPED, "asyncpg", "peer_equipped:app", peers),
        ):
            found.append(
                Case(name, "reference", driver, endpoint, app=app, factory=False, tags=tags)
            )
        for name, pool_case in POOL_CASES:
            found.append(
                Case(
                    name,
                    "pool",
                    "asyncpg",
                    endpoint,
                    app=RENDERED_POOL_APP,
                    env={"BENCH_POOL_CASE": pool_case, **NO_TURNS},
                    tags=("pools",),
                )
            )
        for layer in LAYERS:
            found.append(
                Case(
                    f"layer: {layer}",
                    "layer",
                    "asyncpg",
                    endpoint,
                    app=LAYERS_APP,
                    env={"BENCH_LAYER": layer},
                    tags=("layers",),
                )
            )
        found.append(
            Case(
                PRE_PING,
                "pre-ping",
                "asyncpg",
                endpoint,
                app=RENDERED_POOL_APP,
                env={"BENCH_POOL_CASE": "sqlalchemy-pre-ping", "DB_POOL_PRE_PING": "false"},
                tags=("pre-ping",),
            )
        )
    knobs = {
        "pre_ping off": {"DB_POOL_PRE_PING": "false"},
        "statement timeout off": {"DB_STATEMENT_TIMEOUT": "0"},
        "slow-query log off": {"DB_SLOW_QUERY_MS": "0"},
        "echo on": {"DB_ECHO": "true"},
        "pool size 20": {"DB_POOL_SIZE": "20"},
    }
    for label, env in knobs.items():
        found.append(
            Case(f"asyncpg, {label}", "knob", "asyncpg", endpoints[0], env=env, tags=("knobs",))
        )
    tracing = {
        "tracing, no endpoint": {},
        "tracing, sampler always_off": {
            "OTEL_EXPORTER_OTLP_ENDPOINT": SINK,
            "OTEL_TRACES_SAMPLER": "always_off",
        },
        "tracing, sampler always_on": {
            "OTEL_EXPORTER_OTLP_ENDPOINT": SINK,
            "OTEL_TRACES_SAMPLER": "always_on",
        },
        "tracing, always_on, collector silent": {
            "OTEL_EXPORTER_OTLP_ENDPOINT": SILENT,
            "OTEL_TRACES_SAMPLER": "always_on",
        },
    }
    for endpoint in endpoints:
        for label, env in tracing.items():
            found.append(
                Case(label, "tracing", "asyncpg", endpoint, env=env, project=TRACING_PROJECT)
            )
    found.append(
        Case(
            "asyncpg, pool size 20",
            "knob",
            "asyncpg",
            endpoints[1],
            env=knobs["pool size 20"],
            tags=("knobs",),
        )
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


def pool_table(rounds: list[Round], default_runs: dict[str, list[Result]]) -> list[dict[str, Any]]:
    """The pool cases of each endpoint: (i), the default service as rendered (the median of all
    its runs on the endpoint), then the others with their throughput and p99 latency as
    multiples of the default run adjacent to each; connections opened in the measured run as
    median (min-max) of rounds."""
    rows: list[dict[str, Any]] = []
    for endpoint, defaults in default_runs.items():
        keys = [
            k for k, (result, _) in rounds[0].items() if k[1] == endpoint and result.group == "pool"
        ]
        if not keys or not defaults:
            continue
        rendered = median_result(defaults)
        rows.append(
            {
                "name": POOL_AS_RENDERED,
                "endpoint": endpoint,
                "rps": rendered.rps,
                "p50_ms": rendered.p50_ms,
                "p99_ms": rendered.p99_ms,
                "connections_opened": count_spread([d.connections_opened or 0 for d in defaults]),
                "rps_vs_rendered": None,
                "p99_vs_rendered": None,
            }
        )
        for key in keys:
            result = median_result([r[key][0] for r in rounds])
            rows.append(
                {
                    "name": key[0],
                    "endpoint": endpoint,
                    "rps": result.rps,
                    "p50_ms": result.p50_ms,
                    "p99_ms": result.p99_ms,
                    "connections_opened": count_spread(
                        [r[key][0].connections_opened or 0 for r in rounds]
                    ),
                    "rps_vs_rendered": spread([relative(r[key]) for r in rounds]),
                    "p99_vs_rendered": spread([relative(r[key], "p99_ms") for r in rounds]),
                }
            )
    return rows


# The rendered asyncpg service's targets against the peers: (label, reference, figure, the
# comparison the ratio rendered / reference must pass, the bound).
TARGETS = (
    ("req/s, rendered / (d+)", EQUIPPED, "rps", ">=", 1.25),
    ("req/s, rendered / (d)", PEER, "rps", ">=", 1.10),
    ("p99, rendered / (d+)", EQUIPPED, "p99_ms", "<=", 0.70),
    ("connections opened, rendered / (d)", PEER, "connections_opened", "<=", 0.10),
    ("req/s, rendered / (a) raw asyncpg", RAW, "rps", ">=", 0.33),
)


def layer_table(rounds: list[Round]) -> list[dict[str, Any]]:
    """Per endpoint, each layer's req/s and CPU time per request (medians of rounds), and
    what it adds to the layer before it; the raw-driver app last, as the limit."""
    rows = []
    endpoints = dict.fromkeys(endpoint for _, endpoint in rounds[0])
    for endpoint in endpoints:
        before: float | None = None
        for name in [f"layer: {layer}" for layer in LAYERS] + [RAW]:
            key = (name, endpoint)
            if key not in rounds[0]:
                continue
            cpu = statistics.median(r[key][0].cpu_us for r in rounds)
            layer = name != RAW
            rows.append(
                {
                    "endpoint": endpoint,
                    "name": name,
                    "rps": median_figure([r[key][0].rps for r in rounds]),
                    "cpu_us": round(cpu),
                    "added_cpu_us": round(cpu - before) if layer and before is not None else None,
                }
            )
            before = cpu if layer else before
    return rows


def median_figure(values: list[float]) -> float | int:
    """The median, rounded; whole numbers (connection counts) stay whole."""
    median = round(statistics.median(values), 2)
    return int(median) if median.is_integer() else median


def targets(rounds: list[Round]) -> list[dict[str, Any]]:
    """Each target on each endpoint where its reference ran: the ratio of the default run
    adjacent to the reference's to the reference's own, median (min-max) of rounds, the two
    figures themselves (medians of the same runs), and whether the median meets the target.
    Rounds where the reference opened no connection have no connection ratio."""
    rows = []
    endpoints = dict.fromkeys(endpoint for _, endpoint in rounds[0])
    for endpoint in endpoints:
        for label, reference, figure, comparison, bound in TARGETS:
            key = (reference, endpoint)
            if key not in rounds[0]:
                continue
            pairs = [
                (float(getattr(r[key][1], figure) or 0), float(getattr(r[key][0], figure) or 0))
                for r in rounds
            ]
            values = [rendered / theirs for rendered, theirs in pairs if theirs > 0]
            value = spread(values) if values else None
            met = None
            if value is not None:
                median = value["median"]
                met = (
                    "yes" if (median >= bound if comparison == ">=" else median <= bound) else "no"
                )
            rows.append(
                {
                    "endpoint": endpoint,
                    "figure": label,
                    "target": f"{comparison} {bound:.2f}",
                    "rendered": median_figure([p[0] for p in pairs]),
                    "reference": median_figure([p[1] for p in pairs]),
                    "ratio": value,
                    "met": met,
                }
            )
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
    """Every case (or those that one of `only` selects: a part of the case's name or one of
    its tags, see Case.selected_by) `rounds` times, each round in
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
    selected = [c for c in all_cases if not only or any(c.selected_by(text) for text in only)]
    if not selected:
        raise SystemExit(f"no load case matches --only {only}")
    bench = Bench(work, admin_url, seconds, warmup, connections, baseline, template_ref)

    def measure(case: Case, round_no: int) -> Result:
        started = time.perf_counter()
        result = bench.measure(case)
        print(
            f"  [{round_no}/{rounds}] {case.endpoint:16} {case.name:34} "
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
        bench.prepare(selected)
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
        "targets": targets(by_round),
        "pool": pool_table(by_round, default_runs),
        "pre_ping": against_default(by_round, "pre-ping"),
        "knobs": against_default(by_round, "knob"),
        "tracing": against_default(by_round, "tracing"),
        "layers": layer_table(by_round),
        "otlp_sink": {"exports": Sink.exports, "bytes": Sink.received},
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
