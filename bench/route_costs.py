"""CPU time and requests per second of routes of one app, side by side in shuffled rounds: the
driver of `apps/checkout_parts.py` and `apps/read_forms.py` (bench/README.md).

Run from a rendered default service (`with_example=true`), its environment synced, with
DATABASE_URL set to a migrated database holding items 1 to 1000:

    uv run python <template>/bench/route_costs.py read_forms:create_app \
        session-get built-select built-once --rounds 3 --seconds 4

A route named `post-...` is loaded with `POST /<route>` and a new item each request; any other
with `GET /<route>/<id>`, a random id from 1 to 1000. Each route gets a 1 s warm-up and then
`--seconds` of wrk -t1 -c64; its CPU time per request is the uvicorn process's user and
system time (/proc/<pid>/stat) over the measured run, divided by the requests wrk counted.
Every round is printed, then the medians.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

APPS = Path(__file__).resolve().parent / "apps"
PORT = 8031
GET = 'request = function() return wrk.format("GET", "/{route}/" .. math.random(1, 1000)) end\n'
# Names unique to the run (wrk seeds math.random the same way each time).
POST = """counter = 0
request = function()
  counter = counter + 1
  local body = string.format('{{"name": "{tag}-%d", "price_cents": 5}}', counter)
  return wrk.format("POST", "/{route}", {{["Content-Type"] = "application/json"}}, body)
end
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(route: str, seconds: int, work: Path) -> str:
    """One wrk run against `route`; wrk's report."""
    tag = f"{route}-{time.time_ns()}"
    script = work / f"{tag}.lua"
    template = POST if route.startswith("post-") else GET
    script.write_text(template.format(route=route, tag=tag))
    command = ["wrk", "-t1", "-c64", f"-d{seconds}s", "--latency", "-s", str(script)]
    return subprocess.run(
        [*command, f"http://127.0.0.1:{PORT}"], check=True, capture_output=True, text=True
    ).stdout


def measure(pid: int, route: str, seconds: int, work: Path) -> tuple[int, int, str]:
    """CPU us per request, requests per second and p99 of one measured run."""
    load(route, 1, work)
    before = cpu_seconds(pid)
    report = load(route, seconds, work)
    used = cpu_seconds(pid) - before
    found = re.search(r"(\d+) requests in", report)
    # The latency distribution's line: "99%" also ends figures like "80.99%" above it.
    p99 = re.search(r"^\s*99%\s+(\S+)", report, re.M)
    if found is None or p99 is None or "Non-2xx" in report:
        raise SystemExit(f"{route}: wrk reported errors or no requests:\n{report}")
    requests = int(found.group(1))
    return round(used / requests * 1e6), round(requests / seconds), p99.group(1)


def start(app: str, log: Path) -> subprocess.Popen[bytes]:
    """The app under uvicorn, its output in `log`, once it answers."""
    env = dict(os.environ, PYTHONPATH=str(APPS))
    command = [sys.executable, "-m", "uvicorn", "--factory", app, "--port", str(PORT)]
    with log.open("wb") as output:
        service = subprocess.Popen(
            [*command, "--no-access-log"], env=env, stdout=output, stderr=output
        )
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=1)
            return service
        except OSError:
            time.sleep(0.2)
    service.terminate()
    raise SystemExit(f"{app} did not answer on port {PORT}:\n{log.read_text()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("app", help="module:factory, from bench/apps")
    parser.add_argument("routes", nargs="+")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4)
    args = parser.parse_args()
    figures: dict[str, list[tuple[int, int, str]]] = {route: [] for route in args.routes}
    with tempfile.TemporaryDirectory() as name:
        work = Path(name)
        service = start(args.app, work / "service.log")
        try:
            for number in range(1, args.rounds + 1):
                for route in random.sample(args.routes, len(args.routes)):
                    figures[route].append(measure(service.pid, route, args.seconds, work))
                    us, rps, p99 = figures[route][-1]
                    print(f"round {number}  {route:28} {us:6} us  {rps:6} req/s  p99 {p99}")
        finally:
            service.terminate()
            service.wait()
    print(f"\n{'route':28} {'CPU us per request':>28} {'median':>7}  req/s (median)")
    for route, runs in figures.items():
        cpu = [run[0] for run in runs]
        rates = [run[1] for run in runs]
        listed, middle = ", ".join(map(str, cpu)), statistics.median(cpu)
        print(f"{route:28} {listed:>28} {middle:7.0f}  {statistics.median(rates):.0f}")


if __name__ == "__main__":
    main()
