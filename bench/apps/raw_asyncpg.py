"""Reference (a), the limit: the example's two endpoints on a bare asyncpg pool.

No ORM, no session, no transaction around a single statement: one round trip per query,
plus asyncpg's own reset when a connection goes back to the pool. The pool holds as many
connections as the rendered service may open by default (pool size 5 + overflow 10).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from example import COLUMNS, ItemCreate, ItemRead
from fastapi import FastAPI, HTTPException, Request, status


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    dsn = os.environ["DATABASE_URL"]
    async with asyncpg.create_pool(dsn, min_size=5, max_size=15) as pool:
        app.state.pool = pool
        yield


app = FastAPI(lifespan=lifespan)


@app.get("/items/{item_id}")
async def get_item(item_id: int, request: Request) -> ItemRead:
    row = await request.app.state.pool.fetchrow(
        f"SELECT {COLUMNS} FROM items WHERE id = $1", item_id
    )
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="item not found")
    return ItemRead(**dict(row))


@app.post("/items", status_code=status.HTTP_201_CREATED)
async def create_item(body: ItemCreate, request: Request) -> ItemRead:
    try:
        row = await request.app.state.pool.fetchrow(
            "INSERT INTO items (name, description, price_cents) VALUES ($1, $2, $3)"
            f" RETURNING {COLUMNS}",
            body.name,
            body.description,
            body.price_cents,
        )
    except asyncpg.UniqueViolationError:
        raise HTTPException(status.HTTP_409_CONFLICT, detail="name taken") from None
    return ItemRead(**dict(row))


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
