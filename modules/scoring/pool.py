"""Run scoring work off the event loop, bounded in concurrency, queue length and time.

At most ``threads`` calls run at once (one per worker thread); at most ``max_queued`` more wait
for a thread, beyond that callers get ``PoolBusy`` straight away. A call that has not finished
``timeout_s`` after it was submitted raises ``PoolTimeout`` to its caller; its thread runs on (a
Python thread cannot be stopped) and keeps its slot until it returns, so timed-out work never
lets more than ``threads`` calls run at once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class PoolBusy(Exception):
    """Too many requests are already waiting for a worker thread."""


class PoolTimeout(Exception):
    """The work did not finish within the time limit."""


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
        future = loop.run_in_executor(self._executor, func, *args)
        future.add_done_callback(self._release)
        if not await _until(loop, future, deadline):
            raise PoolTimeout()
        return future.result()

    async def _wait_for_thread(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if len(self._waiters) >= self.max_queued:
            raise PoolBusy()
        slot: asyncio.Future[None] = loop.create_future()
        self._waiters.append(slot)
        try:
            got_it = await _until(loop, slot, deadline)
        except BaseException:
            if slot.done():
                self._hand_over()
            else:
                self._waiters.remove(slot)
            raise
        if not got_it:
            self._waiters.remove(slot)
            raise PoolTimeout()

    def _release(self, _future: asyncio.Future[Any]) -> None:
        """A call returned: its thread goes to the next waiter."""
        self.running -= 1
        self._hand_over()

    def _hand_over(self) -> None:
        """Give a thread slot to the longest waiter, or mark it free."""
        if self._waiters:
            self._waiters.popleft().set_result(None)
        else:
            self._free += 1

    def shutdown(self) -> None:
        """Stop accepting work; running calls finish in the background."""
        self._executor.shutdown(wait=False, cancel_futures=True)


async def _until(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], deadline: float) -> bool:
    """Wait until ``future`` is done (True) or ``deadline`` passes (False), never cancelling it."""
    if future.done():
        return True
    wake: asyncio.Future[None] = loop.create_future()

    def _wake(_: object = None) -> None:
        if not wake.done():
            wake.set_result(None)

    future.add_done_callback(_wake)
    timer = loop.call_at(deadline, _wake)
    try:
        await wake
    finally:
        timer.cancel()
        future.remove_done_callback(_wake)
    return future.done()
