"""Test scaffolding, not template code: the service's own app with one more route, which
writes two rows in one transaction (the request's, SessionDep), waiting between them until
released. After the first write it leaves a marker file with its process id and the server
process id of its connection.

tests/test_kill.py copies it into a rendered project, as `my_service/durability_scaffold.py`,
and runs it as `uvicorn my_service.durability_scaffold:app`, then kills it while requests wait
between their writes."""

import asyncio
import json
import os
from pathlib import Path

from fastapi import FastAPI
from my_service.api.deps import SessionDep
from my_service.main import create_app
from sqlalchemy import text

MARKERS = Path(os.environ["SCAFFOLD_MARKERS"])
app: FastAPI = create_app()
released: dict[str, asyncio.Event] = {}


@app.post("/pairs/{key}", status_code=201)
async def write_pair(key: str, session: SessionDep, commit_between: bool = False) -> dict[str, str]:
    insert = text("INSERT INTO pairs (key, part) VALUES (:key, :part)")
    await session.execute(insert, {"key": key, "part": "a"})
    if commit_between:  # the broken handler of the control case
        await session.commit()
    backend = await session.scalar(text("SELECT pg_backend_pid()"))
    marker = MARKERS / key
    partial = marker.with_suffix(".partial")
    partial.write_text(json.dumps({"pid": os.getpid(), "backend": backend}))
    partial.rename(marker)
    async with asyncio.timeout(60):
        await released.setdefault(key, asyncio.Event()).wait()
    await session.execute(insert, {"key": key, "part": "b"})
    return {"key": key}


@app.post("/pairs/{key}/release", status_code=204)
async def release(key: str) -> None:
    released.setdefault(key, asyncio.Event()).set()
