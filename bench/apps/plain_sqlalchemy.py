"""Reference (c), the ORM's own floor: the example's two endpoints on a plain async
SQLAlchemy session opened in the handler, with SQLAlchemy's defaults (no pre-ping, no
listeners, no session dependency, no error handlers).

The rendered service runs the same ORM calls and adds its own behaviour around them. The gap
between (a) and (c) is what SQLAlchemy's ORM costs; the gap between (c) and the rendered service
is what the layer costs.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from example import Item, ItemCreate, ItemRead
from fastapi import FastAPI, HTTPException, Request, status
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker, create_async_engine


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # The same number of connections as the rendered service's defaults (5 + 10).
    url = make_url(os.environ["DATABASE_URL"]).set(drivername="postgresql+asyncpg")
    engine = create_async_engine(url, pool_size=5, max_overflow=10)
    app.state.sessions = async_sessionmaker(engine, expire_on_commit=False)
    yield
    await engine.dispose()


app = FastAPI(lifespan=lifespan)


@app.get("/items/{item_id}")
async def get_item(item_id: int, request: Request) -> ItemRead:
    async with request.app.state.sessions() as session:
        item = await session.get(Item, item_id)
    if item is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, detail="item not found")
    return ItemRead.model_validate(item)


@app.post("/items", status_code=status.HTTP_201_CREATED)
async def create_item(body: ItemCreate, request: Request) -> ItemRead:
    try:
        async with request.app.state.sessions.begin() as session:
            item = Item(**body.model_dump())
            session.add(item)
    except IntegrityError:
        raise HTTPException(status.HTTP_409_CONFLICT, detail="name taken") from None
    return ItemRead.model_validate(item)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}
