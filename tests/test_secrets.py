"""Secrets stay secret: the rendered service's output (DB_ECHO, debug logs, slow-query lines,
an outage, in text and JSON), its answers, the spans it exports (tracing, to a real OTLP
receiver), and the messages and reprs of its settings and errors
(tests/programs/secrets_probe.py) hold no password, no URL with a user in it, and (but for
answers) no value a request sent.

The module's tests share one rendered project and one throwaway cluster with passwords
(module-scoped fixtures, one pytest-xdist worker); the service runs under uvicorn as a
subprocess once per log format, and each check is a test of its own. A test that stops the
cluster starts it again before it ends; every wait is bounded in time.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import quote

import httpx
import psycopg
import pytest
from psycopg import sql

from harness.otlp import CLIENT, SERVER, Collector, Span
from harness.rendering import clean_env
from harness.services import (
    UV_RUN,
    RestartableCluster,
    Service,
    copy_program,
    migrate,
    render_synced,
    report,
    run,
    throwaway_cluster,
    wait_accepting,
    wait_until,
    with_database,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("secrets")]

# A URL with credentials (scheme://user@ or scheme://user:password@).
FULL_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@'\"]+@")
LOG_FORMATS = ["text", "json"]
REQUEST_TIMEOUT = 10.0
RECOVERY_TIMEOUT = 15.0


class Urls(TypedDict):
    """The service's database URLs (its environment variables), a password in each."""

    DATABASE_URL: str
    DATABASE_READ_URL: str
    DATABASE_MIGRATION_URL: str


@dataclass
class Secrets:
    """What must never show up, and what each check needs to know about it."""

    passwords: list[str]
    values: list[str]  # bound parameter values the test sent

    def forbidden(self) -> set[str]:
        words = set(self.passwords) | {quote(p, safe="") for p in self.passwords}
        return words | {p.split("-")[1] for p in self.passwords}  # the random part alone

    def leaks(self, text: str, *, values: bool = False, urls: bool = False) -> list[str]:
        """The passwords in `text`, and the values sent and URLs with a user if asked."""
        found = sorted(word for word in self.forbidden() if word in text)
        if values:
            found += [value for value in self.values if value in text]
        if urls:
            found += FULL_URL.findall(text)
        return found

    def leaks_by_line(
        self, outputs: dict[str, str], *, values: bool = False, urls: bool = False
    ) -> list[str]:
        return [
            f"{where}: {leaks} in {line[:300]!r}"
            for where, output in outputs.items()
            for line in output.splitlines()
            if (leaks := self.leaks(line, values=values, urls=urls))
        ]


@dataclass
class Setup:
    """The rendered project (read_replica=true: DATABASE_READ_URL carries a password of its
    own too), migrated on a cluster with passwords by a schema owner."""

    project: Path
    cluster: RestartableCluster
    urls: Urls
    secrets: Secrets
    token: str
    price: int
    migrate_output: str


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    project = render_synced(
        tmp_path_factory.mktemp("secrets") / "service", read_replica=True, tracing=True
    )
    token = uuid.uuid4().hex
    # Characters that a URL must escape, so that both spellings are searched for.
    password = f"Pw-{uuid.uuid4().hex[:12]}-@:/%"
    reader_password = f"Rd-{uuid.uuid4().hex[:12]}-#?&"
    owner_password = f"Ow-{uuid.uuid4().hex[:12]}-;' ="
    price = 7_318_093  # beyond any process id, port or line number
    secrets = Secrets(
        [password, reader_password, owner_password],
        [f"name-{token}", f"desc-{token}", str(price)],
    )
    with throwaway_cluster(password=password) as cluster:
        # Three roles, a password each: the service (postgres), its reads (reader) and the
        # migrations, which own the schema (owner).
        with psycopg.connect(cluster.url, autocommit=True, connect_timeout=5) as conn:
            for role, secret in (("owner", owner_password), ("reader", reader_password)):
                query = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}")
                conn.execute(query.format(sql.Identifier(role), sql.Literal(secret)))
            conn.execute("CREATE DATABASE secrets OWNER owner")

        def role_url(role: str, secret: str) -> str:
            return f"postgresql://{role}:{quote(secret, safe='')}@127.0.0.1:{cluster.port}/secrets"

        urls: Urls = {
            "DATABASE_URL": with_database(cluster.url, "secrets"),
            "DATABASE_READ_URL": role_url("reader", reader_password),
            "DATABASE_MIGRATION_URL": role_url("owner", owner_password),
        }
        migrated = migrate(project, urls["DATABASE_URL"], **urls)
        with psycopg.connect(urls["DATABASE_MIGRATION_URL"], autocommit=True) as conn:
            conn.execute("GRANT SELECT ON items TO reader")
        yield Setup(project, cluster, urls, secrets, token, price, migrated)


def restart(cluster: RestartableCluster) -> None:
    cluster.start_server()
    wait_accepting(cluster.url)


@dataclass
class Served:
    """What one run of the service in a log format produced: every answer (status line,
    headers, body), the status of each call against the one it should have, its output."""

    responses: list[str] = field(default_factory=list)
    statuses: list[tuple[str, int, int]] = field(default_factory=list)  # call, expected, got
    stdout: str = ""
    stderr: str = ""
    spans: list[Span] = field(default_factory=list)

    def exchange(
        self, client: httpx.Client, method: str, path: str, expected: int | None, **kwargs: Any
    ) -> httpx.Response:
        """A request whose answer is kept for the search; its status checked if `expected`."""
        response = client.request(method, path, **kwargs)
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
        self.responses.append(
            f"{method} {path} -> {response.status_code}\n{headers}\n{response.text}"
        )
        if expected is not None:
            self.statuses.append((f"{method} {path}", expected, response.status_code))
        return response


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    with Collector() as receiver:
        yield receiver


@pytest.fixture(scope="module", params=LOG_FORMATS)
def served(
    request: pytest.FixtureRequest,
    setup: Setup,
    collector: Collector,
    tmp_path_factory: pytest.TempPathFactory,
) -> Served:
    """The service with DB_ECHO, debug logs, every query counted as slow, every request
    traced and the log format of the parameter: items written and read, a duplicate, health
    and metrics, then the same while the cluster is down, then again once it is back."""
    log_format: str = request.param
    logs = tmp_path_factory.mktemp(f"secrets-{log_format}")
    served = Served()
    before = len(collector.received())
    service = Service(
        setup.project,
        logs / "out",
        stderr_path=logs / "err",
        **setup.urls,
        DB_ECHO="true",
        LOG_LEVEL="DEBUG",
        LOG_FORMAT=log_format,
        DB_SLOW_QUERY_MS="0.001",
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint,
    )
    try:
        service.start()
        with httpx.Client(base_url=service.base_url, timeout=REQUEST_TIMEOUT) as client:
            body = {
                "name": f"name-{setup.token}-{log_format}",
                "description": f"desc-{setup.token}",
                "price_cents": setup.price,
            }
            created = served.exchange(client, "POST", "/items", 201, json=body)
            item = f"/items/{created.json()['id']}" if created.status_code == 201 else "/items/1"
            served.exchange(client, "GET", item, 200)
            served.exchange(client, "GET", "/items", 200, params={"limit": 5})
            served.exchange(client, "POST", "/items", 409, json=body)  # a duplicate
            served.exchange(client, "GET", "/health/db", 200)
            served.exchange(client, "GET", "/metrics", 200)

            setup.cluster.stop_server()
            try:
                outage = {**body, "name": f"name-{setup.token}-{log_format}-outage"}
                served.exchange(client, "POST", "/items", 503, json=outage)
                served.exchange(client, "GET", item, 503)
                served.exchange(client, "GET", "/items", 503)
                served.exchange(client, "GET", "/health/db", 503)
                served.exchange(client, "GET", "/metrics", 200)
            finally:
                restart(setup.cluster)

            wait_until(
                lambda: served.exchange(client, "GET", item, None).status_code == 200,
                RECOVERY_TIMEOUT,
                "the service answers again",
            )
            again = {**body, "name": f"name-{setup.token}-{log_format}-again"}
            served.exchange(client, "POST", "/items", 201, json=again)
            served.exchange(client, "GET", "/health/db", 200)
    finally:
        service.stop()
    served.stdout, served.stderr = service.log(), service.stderr()
    # Stopping the service sent the spans still queued.
    served.spans = collector.received()[before:]
    return served


def test_the_cluster_refuses_a_login_without_the_password(setup: Setup) -> None:
    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(f"postgresql://postgres@127.0.0.1:{setup.cluster.port}/postgres")
    message = str(refused.value)
    assert "password authentication failed" in message or "no password" in message, message
    assert not setup.secrets.leaks(message, values=True)


def test_migrations_run_as_the_owner_and_print_no_secret(setup: Setup) -> None:
    assert "Running upgrade" in setup.migrate_output, setup.migrate_output
    with psycopg.connect(setup.urls["DATABASE_MIGRATION_URL"], autocommit=True) as conn:
        owner = conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'items'")
        assert owner.fetchone() == ("owner",), "the migrations ran as another role"
    output = {"alembic upgrade head": setup.migrate_output}
    problems = setup.secrets.leaks_by_line(output, values=True, urls=True)
    assert not problems, "\n".join(problems[:20])


def test_the_service_ran_what_is_searched(
    served: Served, record_property: Callable[[str, Any], None]
) -> None:
    # The checks below could fail: the echo, the debug lines and the outage really happened.
    report(
        record_property,
        "secrets",
        f"{len(served.stdout.splitlines())} lines of output, {len(served.responses)} answers",
    )
    wrong = [
        f"{call}: {got}, not {expected}"
        for call, expected, got in served.statuses
        if got != expected
    ]
    assert not wrong, "\n".join(wrong)
    assert "INSERT INTO items" in served.stdout, "no statement echoed (DB_ECHO)"
    assert "slow query" in served.stdout, "no slow-query line"
    assert "database unavailable" in served.stdout, "no outage line"


def test_no_secret_or_value_in_the_service_output(served: Served, setup: Setup) -> None:
    outputs = {"stdout": served.stdout, "stderr": served.stderr}
    problems = setup.secrets.leaks_by_line(outputs, values=True, urls=True)
    assert not problems, "\n".join(problems[:20])


def test_no_secret_or_value_in_the_exported_spans(served: Served, setup: Setup) -> None:
    statements = [s for s in served.spans if s.kind == CLIENT]
    assert any("INSERT INTO items" in str(s.attributes["db.statement"]) for s in statements)
    assert any(s.status_message for s in served.spans), "no failed span (the outage)"
    exported = {
        f"span {span.name}": repr(
            [span.attributes, span.events, span.status_message, span.resource]
        )
        for span in served.spans
    }
    problems = setup.secrets.leaks_by_line(exported, values=True, urls=True)
    assert not problems, "\n".join(problems[:20])


def test_reads_are_spans_of_the_read_engine(served: Served) -> None:
    """Through uvicorn, each statement span names the role of the engine that sent it: a
    read's, DATABASE_READ_URL's user; a write's, DATABASE_URL's."""
    routes = {s.trace_id: s.name for s in served.spans if s.kind == SERVER}
    users: dict[str, set[str]] = {}
    for span in served.spans:
        if span.kind == CLIENT and span.trace_id in routes:
            users.setdefault(routes[span.trace_id], set()).add(span.attributes["db.user"])
    assert users["GET /items/{item_id}"] == {"reader"}, users
    assert users["GET /items"] == {"reader"}, users
    assert users["POST /items"] == {"postgres"}, users


def test_no_password_or_url_in_answers(served: Served, setup: Setup) -> None:
    # Answers carry the values sent (the items), but neither passwords nor URLs.
    problems = [
        f"answer: {leaks} in {answer[:300]!r}"
        for answer in served.responses
        if (leaks := setup.secrets.leaks(answer, urls=True))
    ]
    assert not problems, "\n".join(problems[:20])


def test_no_password_in_errors_and_reprs_while_the_database_is_down(
    setup: Setup, record_property: Callable[[str, Any], None]
) -> None:
    probe_path = copy_program("secrets_probe.py", setup.project / "secrets_probe.py")
    setup.cluster.stop_server()
    try:
        # The service's own settings, reprs and errors while the database is down.
        probe = run([*UV_RUN, "python", str(probe_path)], setup.project, clean_env(**setup.urls))
        with pytest.raises(psycopg.OperationalError) as down:
            psycopg.connect(setup.urls["DATABASE_URL"], connect_timeout=5)
    finally:
        restart(setup.cluster)
    logged, _, printed = probe.partition("MESSAGES ")
    caught: list[str] = [*json.loads(printed.splitlines()[0]), str(down.value)]
    report(record_property, "secrets probe", f"{len(caught)} exception messages and reprs")
    # Exception messages and reprs: no password (a URL with the password masked may appear).
    problems = [
        f"exception or repr: {leaks} in {message[:300]!r}"
        for message in caught
        if (leaks := setup.secrets.leaks(message, values=True))
    ]
    outputs = {"the probe's log": logged + printed.partition("\n")[2]}
    problems += setup.secrets.leaks_by_line(outputs, values=True, urls=True)
    assert not problems, "\n".join(problems[:20])
