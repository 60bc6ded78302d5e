"""Run scoring work off the event loop, bounded in concurrency, queue length and time.

At most ``threads`` calls run at once (one per worker thread); at most ``max_queued`` more wait
for a thread, beyond that callers get ``PoolBusy`` straight away. A call that has not finished
``timeout_s`` after it was submitted raises ``PoolTimeout`` to its caller; its thread runs on (a
Python thread cannot be stopped) and keeps its slot until it returns, so timed-out work never
lets more than ``threads`` calls run at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class PoolBusy(Exception):
    """Too many requests are already waiting for a worker thread."""


class PoolTimeout(Exception):
    """The work did not finish within the time limit."""


class PoolClosed(Exception):
    """The server is shutting down and stopped waiting for this work."""


class InferencePool:
    """A bounded thread pool for blocking scoring calls, used from one event loop."""

    def __init__(self, threads: int, max_queued: int, timeout_s: float) -> None:
        if threads < 1:
            raise ValueError(f"threads must be at least 1, got {threads}")
        self.threads = threads
        self.max_queued = max_queued
        self.timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="score")
        self._free = threads
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._pending: set[asyncio.Future[Any]] = set()
        self.running = 0
        """Calls holding a thread right now (timed-out ones included until they return)."""

    @property
    def queued(self) -> int:
        """Calls waiting for a thread."""
        return len(self._waiters)

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """Call ``func(*args)`` in a worker thread; raises PoolBusy, PoolTimeout or what func raises."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        if self._free > 0 and not self._waiters:
            self._free -= 1
        else:
            await self._wait_for_thread(loop, deadline)
        self.running += 1
        result: asyncio.Future[T] = loop.create_future()
        try:
            work = self._executor.submit(func, *args)
        except RuntimeError:  # shut down
            self.running -= 1
            self._hand_over()
            raise PoolClosed() from None
        work.add_done_callback(lambda done: _call_soon(loop, self._finished, done, result))
        timer = loop.call_at(deadline, _expire, result)
        self._pending.add(result)
        try:
            return await result
        finally:
            timer.cancel()
            self._pending.discard(result)

    def _finished(self, work: Future[T], result: asyncio.Future[T]) -> None:
        """On the loop, when a worker returns: hand its thread on and settle the caller's future."""
        self.running -= 1
        self._hand_over()
        if result.done():  # timed out (or the caller went away) before the work finished
            return
        if work.cancelled():
            result.set_exception(PoolClosed())
        elif (error := work.exception()) is not None:
            result.set_exception(error)
        else:
            result.set_result(work.result())

    async def _wait_for_thread(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if len(self._waiters) >= self.max_queued:
            raise PoolBusy()
        slot: asyncio.Future[None] = loop.create_future()
        self._waiters.append(slot)
        timer = loop.call_at(deadline, _expire, slot)
        try:
            await slot
        except BaseException:
            if slot.done() and not slot.cancelled() and slot.exception() is None:
                self._hand_over()  # given a thread, but leaving: pass it on
            elif slot in self._waiters:
                self._waiters.remove(slot)
            raise
        finally:
            timer.cancel()

    def _hand_over(self) -> None:
        """Give a thread slot to the longest waiter still waiting, or mark it free."""
        while self._waiters:
            slot = self._waiters.popleft()
            if not slot.done():
                slot.set_result(None)
                return
        self._free += 1

    def abandon(self) -> None:
        """Answer every caller still waiting with PoolClosed (their threads run on, unobserved)."""
        for future in (*self._pending, *self._waiters):
            if not future.done():
                future.set_exception(PoolClosed())

    def shutdown(self) -> None:
        """Stop accepting work; running calls finish in the background."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(PoolTimeout())


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """Schedule ``callback`` on ``loop`` from a worker thread, unless the loop has closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)
