"""Property-based test of the rendered example API, for each driver: the service runs under
uvicorn on a new, migrated database, and schemathesis drives it with requests generated from
the service's own OpenAPI schema, valid and invalid ones, a bounded number per operation, in
the coverage, fuzzing and stateful phases. The seed is the driver's and the commit's: a run
of one commit replays the same requests, and each driver and each new commit draws others
than the last, so that one seed does not hide a case for good. Every check it has runs
(`--checks all`): no 5xx, every answer as documented (status, content type, headers, body),
valid input accepted and invalid refused, Allow on 405, created items readable and deleted
ones gone."""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.rendering import REPO_ROOT, answer_values
from harness.services import (
    migrate,
    render_synced,
    running_service,
    scratch_database,
    with_database,
)

SCHEMATHESIS = Path(sys.executable).parent / "schemathesis"
# Examples per operation and phase; the coverage phase adds boundary values of every
# parameter and the stateful phase sequences of calls: about 500 requests per service.
MAX_EXAMPLES = 50
# Every check in every phase, none turned off. One is told about the example API's contract:
# a valid If-Match that names another version of the item answers 412 (Precondition Failed).
CONFIG = """
[[operations]]
include-path = "/items/{item_id}"
include-method = ["PATCH", "DELETE"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "404", "409", "412"]
"""


@contextlib.contextmanager
def new_database(driver: str, pg_admin_url: str, tmp_path: Path) -> Iterator[str]:
    """The DATABASE_URL of a new, empty database for `driver`, dropped afterwards."""
    if driver == "aiosqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'items.db'}"
        return
    with scratch_database(pg_admin_url, f"api_properties_{driver}") as name:
        yield with_database(pg_admin_url, name)


def seed(driver: str) -> int:
    """The seed of `driver`'s run at this checkout's commit (uncommitted changes aside)."""
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    return int(hashlib.sha256(f"{head} {driver}".encode()).hexdigest()[:8], 16)


def schemathesis(base_url: str, workdir: Path, seed: int) -> subprocess.CompletedProcess[str]:
    """Run it in `workdir`, where it writes its report and its cache of failures (which it
    would replay in later runs)."""
    (workdir / "schemathesis.toml").write_text(CONFIG)
    command = [
        *(str(SCHEMATHESIS), "--config-file", "schemathesis.toml"),
        *("run", f"{base_url}/openapi.json", "--checks", "all"),
        *("--phases", "examples,coverage,fuzzing,stateful"),
        *("--max-examples", str(MAX_EXAMPLES)),
        # The same requests in the same order for a seed: a failure can be replayed.
        *("--seed", str(seed), "--workers", "1"),
        *("--request-timeout", "10", "--no-color"),
        *("--report", "json", "--report-json-path", "report.json"),
    ]
    return subprocess.run(command, cwd=workdir, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("driver", answer_values("db_driver"))
def test_generated_requests_get_documented_answers(
    tmp_path: Path,
    pg_admin_url: str,
    driver: str,
    record_property: Any,
) -> None:
    started = time.monotonic()
    root = render_synced(tmp_path / "service", db_driver=driver)
    workdir = tmp_path / "schemathesis"
    workdir.mkdir()
    with new_database(driver, pg_admin_url, tmp_path) as url:
        migrate(root, url)
        with running_service(root, tmp_path / "service.log", DATABASE_URL=url) as service:
            result = schemathesis(service.base_url, workdir, seed(driver))
            assert service.proc is not None
            assert service.proc.poll() is None, "the service stopped"
        log = service.log()
    output = f"seed {seed(driver)}\n" + result.stdout[-8000:] + result.stderr[-2000:]
    assert result.returncode == 0, output
    report = json.loads((workdir / "report.json").read_text())
    cases = report["test_cases"]
    assert report["complete"], output
    phases = {
        name: report["phases"][name]["status"] for name in ("coverage", "fuzzing", "stateful")
    }
    assert set(phases.values()) == {"success"}, phases
    assert report["operations"]["tested"] == report["operations"]["total"] == 7, output
    assert (report["failures"], report["errors"], cases["errored"]) == ([], [], 0), output
    assert cases["generated"] >= 200, output
    # No answer was a 500, so no traceback, which would carry the driver's message.
    assert "Traceback" not in log, log[-4000:]
    assert '" 500' not in log, log[-4000:]
    record_property(
        "figures",
        f"schemathesis, {driver}: {cases['generated']} generated requests, "
        f"{report['running_time']:.1f} s of them, {time.monotonic() - started:.1f} s in all "
        "(render, uv sync, migrate, start)",
    )
