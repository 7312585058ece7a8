"""Secrets stay secret: the rendered service's output (DB_ECHO, debug logs, slow-query lines,
an outage, in text and JSON), its answers, and the messages and reprs of its settings and
errors (tests/programs/secrets_probe.py) hold no password, no URL with a user in it, and
(but for answers) no value a request sent.

The test has a throwaway cluster of its own, with passwords, and runs the service under
uvicorn as a subprocess. Every wait is bounded in count and time.
"""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict
from urllib.parse import quote

import httpx
import psycopg
import pytest
from psycopg import sql

from harness.rendering import clean_env
from harness.services import (
    UV_RUN,
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

# A URL with credentials (scheme://user@ or scheme://user:password@).
FULL_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s/@'\"]+@")


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


def exchange(
    client: httpx.Client, seen: list[str], method: str, path: str, **kwargs: Any
) -> httpx.Response:
    """A request whose answer (status line, headers, body) is kept for the search."""
    response = client.request(method, path, **kwargs)
    headers = "\n".join(f"{k}: {v}" for k, v in response.headers.multi_items())
    seen.append(f"{method} {path} -> {response.status_code}\n{headers}\n{response.text}")
    return response


@pytest.mark.slow
def test_no_secret_in_output_answers_or_errors(
    tmp_path: Path, record_property: Callable[[str, Any], None]
) -> None:
    # With a replica: DATABASE_READ_URL carries a password of its own too.
    project = render_synced(tmp_path / "service", read_replica=True)
    probe_path = copy_program("secrets_probe.py", project / "secrets_probe.py")
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
    responses: list[str] = []
    caught: list[str] = []
    outputs: dict[str, str] = {}
    statuses: Counter[int] = Counter()

    with throwaway_cluster(password=password) as cluster:
        host = f"127.0.0.1:{cluster.port}"
        # The password is really used: without it the server refuses the login.
        with pytest.raises(psycopg.OperationalError) as refused:
            psycopg.connect(f"postgresql://postgres@{host}/postgres", connect_timeout=5)
        caught.append(str(refused.value))
        assert "password authentication failed" in str(refused.value) or "no password" in str(
            refused.value
        ), refused.value
        # Three roles, a password each: the service (postgres), its reads (reader) and the
        # migrations, which own the schema (owner).
        with psycopg.connect(cluster.url, autocommit=True, connect_timeout=5) as conn:
            for role, secret in (("owner", owner_password), ("reader", reader_password)):
                query = sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}")
                conn.execute(query.format(sql.Identifier(role), sql.Literal(secret)))
            conn.execute("CREATE DATABASE secrets OWNER owner")
        database_url = with_database(cluster.url, "secrets")
        read_url = f"postgresql://reader:{quote(reader_password, safe='')}@{host}/secrets"
        migration_url = f"postgresql://owner:{quote(owner_password, safe='')}@{host}/secrets"
        urls: Urls = {
            "DATABASE_URL": database_url,
            "DATABASE_READ_URL": read_url,
            "DATABASE_MIGRATION_URL": migration_url,
        }
        outputs["alembic upgrade head"] = migrate(project, database_url, **urls)
        with psycopg.connect(migration_url, autocommit=True, connect_timeout=5) as conn:
            owner = conn.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'items'")
            assert owner.fetchone() == ("owner",), "the migrations ran as another role"
            conn.execute("GRANT SELECT ON items TO reader")

        for log_format in ("text", "json"):
            service = Service(
                project,
                tmp_path / f"{log_format}.out",
                stderr_path=tmp_path / f"{log_format}.err",
                **urls,
                DB_ECHO="true",
                LOG_LEVEL="DEBUG",
                LOG_FORMAT=log_format,
                DB_SLOW_QUERY_MS="0.001",
            )
            try:
                service.start()
                with httpx.Client(base_url=service.base_url, timeout=10) as client:
                    body = {
                        "name": f"name-{token}-{log_format}",
                        "description": f"desc-{token}",
                        "price_cents": price,
                    }
                    created = exchange(client, responses, "POST", "/items", json=body)
                    assert created.status_code == 201, created.text
                    item = f"/items/{created.json()['id']}"
                    calls: list[tuple[str, str, dict[str, Any]]] = [
                        ("GET", item, {}),
                        ("GET", "/items", {"params": {"limit": 5}}),
                        ("POST", "/items", {"json": body}),  # a duplicate: 409
                        ("GET", "/health/db", {}),
                        ("GET", "/metrics", {}),
                    ]
                    for method, path, kwargs in calls:
                        statuses[
                            exchange(client, responses, method, path, **kwargs).status_code
                        ] += 1

                    cluster.stop_server()
                    outage = {**body, "name": f"name-{token}-{log_format}-outage"}
                    outage_calls: list[tuple[str, str, dict[str, Any]]] = [
                        ("POST", "/items", {"json": outage}),
                        ("GET", item, {}),
                        ("GET", "/items", {}),
                        ("GET", "/health/db", {}),
                    ]
                    for method, path, kwargs in outage_calls:
                        response = exchange(client, responses, method, path, **kwargs)
                        assert response.status_code == 503, (path, response.text)
                        statuses[503] += 1
                    exchange(client, responses, "GET", "/metrics")
                    if log_format == "text":
                        # The service's own errors while the database is down.
                        probe = run(
                            [*UV_RUN, "python", str(probe_path)],
                            project,
                            clean_env(**urls),
                        )
                        logged, _, printed = probe.partition("MESSAGES ")
                        caught.extend(json.loads(printed.splitlines()[0]))
                        outputs["the probe's log"] = logged + printed.partition("\n")[2]
                        with pytest.raises(psycopg.OperationalError) as down:
                            psycopg.connect(database_url, connect_timeout=5)
                        caught.append(str(down.value))

                    cluster.start_server()
                    wait_accepting(cluster.url)

                    def answers_again(item: str = item) -> bool:
                        return exchange(client, responses, "GET", item).status_code == 200

                    wait_until(answers_again, 15, "the service answers again")
                    again = {**body, "name": f"name-{token}-{log_format}-again"}
                    assert (
                        exchange(client, responses, "POST", "/items", json=again).status_code == 201
                    )
                    assert exchange(client, responses, "GET", "/health/db").status_code == 200
            finally:
                service.stop()
            outputs[f"stdout, LOG_FORMAT={log_format}"] = service.log()
            outputs[f"stderr, LOG_FORMAT={log_format}"] = service.stderr()

    # The checks could fail: the echo, the debug lines and the outage really happened.
    text_log = outputs["stdout, LOG_FORMAT=text"]
    json_log = outputs["stdout, LOG_FORMAT=json"]
    assert "Running upgrade" in outputs["alembic upgrade head"], outputs["alembic upgrade head"]
    for log in (text_log, json_log):
        assert "INSERT INTO items" in log, "no statement echoed (DB_ECHO)"
        assert "slow query" in log, "no slow-query line"
        assert "database unavailable" in log, "no outage line"
    assert statuses == {200: 8, 409: 2, 503: 8}, statuses

    # Output: no password, no URL with a user in it, no value a request sent.
    problems = [
        f"{where}: {leaks} in {line[:300]!r}"
        for where, output in outputs.items()
        for line in output.splitlines()
        if (leaks := secrets.leaks(line, values=True, urls=True))
    ]
    # Answers carry the values sent (the items), but neither passwords nor URLs.
    problems += [
        f"answer: {leaks} in {answer[:300]!r}"
        for answer in responses
        if (leaks := secrets.leaks(answer, urls=True))
    ]
    # Exception messages and reprs: no password (a URL with the password masked may appear).
    problems += [
        f"exception or repr: {leaks} in {message[:300]!r}"
        for message in caught
        if (leaks := secrets.leaks(message, values=True))
    ]
    lines = sum(len(output.splitlines()) for output in outputs.values())
    figures = (
        f"{lines} lines of output, {len(responses)} answers, {len(caught)} exception messages "
        f"searched; statuses {dict(statuses)}"
    )
    report(record_property, "secrets", figures)
    assert not problems, "\n".join(problems[:20])
