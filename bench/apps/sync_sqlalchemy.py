"""Reference (b), the usual alternative: the same endpoints with a synchronous SQLAlchemy
session on psycopg, run by FastAPI in its thread pool (plain `def` handlers).

Pool settings match the rendered service's defaults: 5 + 10 connections, pre-ping on. Each
handler opens its session itself: a `yield` dependency would hold a pooled connection while
its exit waits for a free thread, and with 40 threads on 15 connections that deadlocks until
the pool timeout.
"""

from __future__ import annotations

import os

from example import Item, ItemCreate, ItemRead
from fastapi import FastAPI, HTTPException, status
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

engine = create_engine(
    make_url(os.environ["DATABASE_URL"]).set(drivername="postgresql+psycopg"),
    pool_size=5,
    max_overflow=10,
    pool_pre_ping=True,
)
Sessions = sessionmaker(engine, expire_on_commit=False)


app = FastAPI()


@app.get("/items/{item_id}")
def get_item(item_id: int) -> ItemRead:
    with Sessions.begin() as session:
        item = session.get(Item, item_id)
        if item is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, detail="item not found")
        return ItemRead.model_validate(item)


@app.post("/items", status_code=status.HTTP_201_CREATED)
def create_item(body: ItemCreate) -> ItemRead:
    with Sessions.begin() as session:
        item = Item(**body.model_dump())
        session.add(item)
        try:
            session.flush()
        except IntegrityError:
            raise HTTPException(status.HTTP_409_CONFLICT, detail="name taken") from None
        session.refresh(item)
        return ItemRead.model_validate(item)


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}
