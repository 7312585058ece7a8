"""Reference (d), what a user would pick instead: the session pattern other FastAPI templates
render. A `yield` dependency opens a session from `async_sessionmaker(engine,
expire_on_commit=False)` for each request; the engine has SQLAlchemy's stock pool (5 + 10
connections, `pool_pre_ping=True`) on asyncpg; the POST handler commits, GET only reads (the
session's close rolls its transaction back).

The queries are those of the rendered service and of (c): `session.get` for GET, an INSERT whose
RETURNING brings back id and created_at for POST (no reload after the commit).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from example import Item, ItemCreate, ItemRead
from fastapi import Depends, FastAPI, HTTPException, Request, status
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    url = make_url(os.environ["DATABASE_URL"]).set(drivername="postgresql+asyncpg")
    engine = create_async_engine(url, pool_size=5, max_overflow=10, pool_pre_ping=True)
    app.state.sessionmaker = async_sessionmaker(engine, expire_on_commit=False)
    yield
    await engine.dispose()


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessionmaker() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


def make_app() -> FastAPI:
    """A new application with (d)'s routes: reference (d+) (`peer_equipped.py`) builds on it."""
    app = FastAPI(lifespan=lifespan)

    @app.get("/items/{item_id}")
    async def get_item(item_id: int, session: SessionDep) -> ItemRead:
        item = await session.get(Item, item_id)
        if item is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail="item not found")
        return ItemRead.model_validate(item)

    @app.post("/items", status_code=status.HTTP_201_CREATED)
    async def create_item(body: ItemCreate, session: SessionDep) -> ItemRead:
        item = Item(**body.model_dump())
        session.add(item)
        try:
            await session.commit()
        except IntegrityError:
            raise HTTPException(status.HTTP_409_CONFLICT, detail="name taken") from None
        return ItemRead.model_validate(item)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


app = make_app()
