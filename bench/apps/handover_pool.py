"""A bench-only copy of the template's hand-over pool (`HandOverQueuePool`, from
`template/src/{{ package_name }}/db/pool.py` at c7e2fb2, unchanged but for this docstring), so
that pool case (iv) of `bench/service_load.py` can put it under any rendered service, also
once the template no longer has it.

SQLAlchemy's asyncio queue pool, except that a connection returned while checkouts wait goes
to the one that has waited longest instead of being closed. With the stock pool, connections
returned while checkouts wait fill the idle queue before the waiting tasks run, so under
steady load above `pool_size` further returns are closed and the waiting requests open new
connections, while newcomers can take the queued connections ahead of those that waited.
Here a connection beyond `pool_size` is still closed once nobody waits for it.

This builds on two private parts of SQLAlchemy: `QueuePool._queue_class` and
`sqlalchemy.util.queue.AsyncAdaptedQueue`. `rendered_pool.py` fails at start-up when the
engine's pool does not hold its connections in a HandOverQueue.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from sqlalchemy.pool import AsyncAdaptedQueuePool, ConnectionPoolEntry
from sqlalchemy.util import await_
from sqlalchemy.util.queue import AsyncAdaptedQueue, Empty, Full


class HandOverQueue(AsyncAdaptedQueue[ConnectionPoolEntry]):
    """The pool's idle connections. A returned connection goes straight to the checkout that
    has waited longest, so no newcomer takes it first; with nobody waiting it joins the idle
    ones, or is refused (Full, and the pool closes it) when `maxsize` are idle already."""

    def __init__(self, maxsize: int = 0, use_lifo: bool = False) -> None:
        super().__init__(maxsize, use_lifo)
        self._idle: deque[ConnectionPoolEntry] = deque()
        self._waiters: deque[asyncio.Future[ConnectionPoolEntry]] = deque()

    def empty(self) -> bool:
        return not self._idle

    def full(self) -> bool:
        return len(self._idle) >= self.maxsize

    def qsize(self) -> int:
        return len(self._idle)

    def waiting(self) -> int:
        """Checkouts waiting for a connection now."""
        return len(self._waiters)

    def put_nowait(self, item: ConnectionPoolEntry) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():  # done: it timed out or was cancelled
                waiter.set_result(item)
                return
        if self.full():
            raise Full()
        self._idle.append(item)

    def put(
        self, item: ConnectionPoolEntry, block: bool = True, timeout: float | None = None
    ) -> None:
        self.put_nowait(item)

    def get_nowait(self) -> ConnectionPoolEntry:
        if not self._idle:
            raise Empty()
        return self._idle.pop() if self.use_lifo else self._idle.popleft()

    def get(self, block: bool = True, timeout: float | None = None) -> ConnectionPoolEntry:
        if self._idle or not block:
            return self.get_nowait()
        waiter: asyncio.Future[ConnectionPoolEntry] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await_(asyncio.wait_for(waiter, timeout))
        except TimeoutError as exc:
            raise Empty() from exc
        except BaseException:
            # Cancelled after a connection was handed over: pass it on, or it would be lost.
            if waiter.done() and not waiter.cancelled():
                self.put_nowait(waiter.result())
            raise
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)


class HandOverQueuePool(AsyncAdaptedQueuePool):
    """SQLAlchemy's asyncio queue pool on a HandOverQueue."""

    _queue_class = HandOverQueue

    def waiting(self) -> int:
        """Checkouts waiting for a connection now."""
        queue = self._pool
        assert isinstance(queue, HandOverQueue)
        return queue.waiting()


# SQLAlchemy names a pool's logger after the pool's class, so this pool logs under this module
# instead of "sqlalchemy.pool"; keep it at the level SQLAlchemy gives its own loggers.
logging.getLogger(f"{__name__}.{HandOverQueuePool.__name__}").setLevel(logging.WARNING)
