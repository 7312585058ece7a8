"""Latency of a read session under 64 concurrent tasks taking 15 turns, in one process and
without HTTP: AsyncSession's own `async with` (closing in a shielded task of its own) against
a plain `await session.close()`. It separates the pool and the turns from the HTTP server in
the tail latency of bench/README.md ("Where the checkout's time goes").

Run it in a rendered default service whose database holds the example's item 1:

    uv run python <template>/bench/close_tail.py [seconds] [rounds]

DATABASE_URL as for the service (default: the rendered default's local PostgreSQL).
Prints one line per close and round, alternating, with every figure.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

URL = os.environ.get("DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1/my_service")
TASKS, TURNS = 64, 15
QUERY = text("SELECT id, name FROM items WHERE id = 1")


async def read_shielded(maker: async_sessionmaker[AsyncSession]) -> None:
    async with maker() as session:
        await session.execute(QUERY)


async def read_plain(maker: async_sessionmaker[AsyncSession]) -> None:
    session = maker()
    try:
        await session.execute(QUERY)
    finally:
        await session.close()


async def measure(read: str, seconds: float) -> str:
    engine = create_async_engine(URL, pool_size=TURNS, max_overflow=0)
    maker = async_sessionmaker(engine, expire_on_commit=False)
    one = read_shielded if read == "shielded" else read_plain
    turns = asyncio.Semaphore(TURNS)
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def task() -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            async with turns:
                await one(maker)
            latencies.append(time.perf_counter() - started)

    cpu = time.process_time()
    await asyncio.gather(*(task() for _ in range(TASKS)))
    cpu = time.process_time() - cpu
    await engine.dispose()
    latencies.sort()
    n = len(latencies)
    return (
        f"{read:8} {n / seconds:7.0f} sessions/s  cpu {cpu / n * 1e6:4.0f} us  "
        f"p50 {latencies[n // 2] * 1e3:5.1f} ms  p99 {latencies[int(n * 0.99)] * 1e3:5.1f} ms  "
        f"max {latencies[-1] * 1e3:5.1f} ms"
    )


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 6.0
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    for n in range(1, rounds + 1):
        for read in ("shielded", "plain"):
            print(f"[{n}/{rounds}] {asyncio.run(measure(read, seconds))}", flush=True)


if __name__ == "__main__":
    main()
