"""The example API's contract as clients meet it through a real server (uvicorn), for each
driver: clients that read, change and write back an item concurrently, sending If-Match,
lose no update (each lost race is a 412, and the client tries again); HEAD answers as GET
without a body; a 405 lists every method of the path."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest

from harness.rendering import answer_values
from harness.services import drive_load, migrate, render_synced, running_service
from tests.test_api_properties import new_database

CLIENTS = 50


async def increment(client: httpx.AsyncClient, url: str, answers: Counter[int]) -> None:
    """What a careful client does: GET, PATCH the price plus one with the ETag in If-Match,
    and on 412 start again from a fresh GET."""
    for _ in range(CLIENTS * 2):
        read = await client.get(url)
        assert read.status_code == 200, read.text
        change = {"price_cents": read.json()["price_cents"] + 1}
        written = await client.patch(url, json=change, headers={"If-Match": read.headers["etag"]})
        answers[written.status_code] += 1
        if written.status_code != 412:
            return
    raise AssertionError(f"no PATCH of {url} went through in {CLIENTS * 2} tries")


async def concurrent_increments(base_url: str) -> tuple[Counter[int], httpx.Response]:
    async with httpx.AsyncClient(base_url=base_url) as client:
        created = await client.post("/items", json={"name": "counter", "price_cents": 0})
        assert created.status_code == 201, created.text
        url = f"/items/{created.json()['id']}"
        answers: Counter[int] = Counter()
        await drive_load(
            base_url,
            CLIENTS,
            CLIENTS,
            lambda c, _: increment(c, url, answers),
            request_timeout=30,
            timeout=120,
        )
        return answers, await client.get(url)


@pytest.mark.slow
@pytest.mark.parametrize("driver", answer_values("db_driver"))
def test_clients_meet_the_contract_through_uvicorn(
    tmp_path: Path, pg_admin_url: str, driver: str
) -> None:
    root = render_synced(tmp_path / "service", db_driver=driver)
    with new_database(driver, pg_admin_url, tmp_path) as url:
        migrate(root, url)
        with running_service(root, tmp_path / "service.log", DATABASE_URL=url) as service:
            answers, final = asyncio.run(concurrent_increments(service.base_url))
            with httpx.Client(base_url=service.base_url) as client:
                get, head = client.get("/health"), client.head("/health")
                options = {p: client.options(p) for p in ("/items/1", "/items", "/health")}
        log = service.log()

    # Every 200 is one increment the item kept; every other try was told it lost the race.
    assert set(answers) == {200, 412}, answers
    assert answers[200] == CLIENTS, answers
    assert final.json()["price_cents"] == CLIENTS, (final.json(), answers)
    assert final.headers["etag"] == f'"{CLIENTS + 1}"'

    assert (head.status_code, head.content) == (200, b"")
    assert head.headers["content-length"] == get.headers["content-length"]
    assert {p: (r.status_code, r.headers.get("allow")) for p, r in options.items()} == {
        "/items/1": (405, "DELETE, GET, HEAD, PATCH"),
        "/items": (405, "GET, HEAD, POST"),
        "/health": (405, "GET, HEAD"),
    }
    assert "Traceback" not in log, log[-4000:]
