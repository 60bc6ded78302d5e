"""Run scoring work off the event loop, bounded in concurrency, queue length and time.

At most ``threads`` calls run at once (one per worker thread); at most ``max_queued`` more wait
for a thread, beyond that callers get ``PoolBusy`` straight away. A call that has not finished
``timeout_s`` after it was submitted raises ``PoolTimeout`` to its caller; its thread runs on (a
Python thread cannot be stopped) and keeps its slot until it returns, so timed-out work never
lets more than ``threads`` calls run at once.

The worker threads are the pool's own: each waits on one shared ``SimpleQueue`` and hands its
result back with a single ``call_soon_threadsafe``, so a call costs one queue put and one loop
wake-up (no ``concurrent.futures`` future, lock or condition per call).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from queue import SimpleQueue
from typing import Any, TypeVar

T = TypeVar("T")
_Job = tuple[Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, asyncio.Future[Any]]


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
        self._jobs: SimpleQueue[_Job | None] = SimpleQueue()
        self._workers: list[threading.Thread] = []
        self._closed = False
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
        if self._closed:
            self._hand_over()
            raise PoolClosed()
        if not self._workers:
            self._start_workers()
        self.running += 1
        result: asyncio.Future[T] = loop.create_future()
        timer = loop.call_at(deadline, _expire, result)
        self._pending.add(result)
        self._jobs.put((func, args, loop, result))
        try:
            return await result
        finally:
            timer.cancel()
            self._pending.discard(result)

    def _start_workers(self) -> None:
        for n in range(self.threads):
            worker = threading.Thread(target=self._work, name=f"score_{n}", daemon=True)
            worker.start()
            self._workers.append(worker)

    def _work(self) -> None:
        """A worker thread: run jobs until the ``None`` that ``shutdown`` sends."""
        jobs = self._jobs
        while (job := jobs.get()) is not None:
            func, args, loop, result = job
            del job
            value: Any = None
            error: BaseException | None = None
            if self._closed:
                error = PoolClosed()
            else:
                try:
                    value = func(*args)
                except BaseException as exc:
                    error = exc
            _call_soon(loop, self._finished, result, value, error)
            del func, args, loop, result, value, error

    def _finished(self, result: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
        """On the loop, when a worker returns: hand its thread on and settle the caller's future."""
        self.running -= 1
        self._hand_over()
        if result.done():  # timed out (or the caller went away) before the work finished
            return
        if error is not None:
            result.set_exception(error)
        else:
            result.set_result(value)

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
        """Stop accepting work; running calls finish in the background, queued ones get PoolClosed."""
        if self._closed:
            return
        self._closed = True
        for _ in self._workers:
            self._jobs.put(None)


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(PoolTimeout())


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    """Schedule ``callback`` on ``loop`` from a worker thread, unless the loop has closed."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)
