"""InferencePool: bounded threads, bounded queue, timeouts that keep the slot until the thread returns."""

from __future__ import annotations

import asyncio
import threading

import pytest

from modules.scoring.pool import InferencePool, PoolBusy, PoolClosed, PoolTimeout


async def test_result_and_exception_come_back() -> None:
    pool = InferencePool(threads=2, max_queued=4, timeout_s=30)
    assert await pool.run(sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        await pool.run(lambda: 1 / 0)
    assert (pool.running, pool.queued) == (0, 0)
    pool.shutdown()


async def test_never_more_running_than_threads_and_queue_is_bounded() -> None:
    pool = InferencePool(threads=2, max_queued=1, timeout_s=30)
    release = threading.Event()
    started = threading.Semaphore(0)
    lock = threading.Lock()
    active = peak = 0

    def work() -> None:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        started.release()
        release.wait()
        with lock:
            active -= 1

    running = [asyncio.create_task(pool.run(work)) for _ in range(2)]
    await asyncio.to_thread(started.acquire)
    await asyncio.to_thread(started.acquire)
    waiting = asyncio.create_task(pool.run(work))
    await asyncio.sleep(0)
    assert pool.queued == 1
    with pytest.raises(PoolBusy):
        await pool.run(work)
    release.set()
    await asyncio.gather(*running, waiting)
    assert peak == 2
    assert (pool.running, pool.queued) == (0, 0)
    pool.shutdown()


async def test_timeout_answers_caller_but_thread_keeps_its_slot() -> None:
    pool = InferencePool(threads=1, max_queued=4, timeout_s=0.05)
    release = threading.Event()
    with pytest.raises(PoolTimeout):
        await pool.run(release.wait)
    assert pool.running == 1, "the timed-out call still holds the only thread"
    with pytest.raises(PoolTimeout):  # waits for the thread, which never frees up in time
        await pool.run(int)
    release.set()
    pool.timeout_s = 30
    assert await pool.run(int, "7") == 7
    assert (pool.running, pool.queued) == (0, 0)
    pool.shutdown()


async def test_cancelled_waiter_passes_its_slot_on() -> None:
    pool = InferencePool(threads=1, max_queued=4, timeout_s=30)
    release = threading.Event()
    first = asyncio.create_task(pool.run(release.wait))
    await asyncio.sleep(0)
    second = asyncio.create_task(pool.run(int, "2"))
    third = asyncio.create_task(pool.run(int, "3"))
    await asyncio.sleep(0)
    second.cancel()
    release.set()
    assert await first is True
    assert await third == 3
    assert second.cancelled()
    assert (pool.running, pool.queued) == (0, 0)
    pool.shutdown()


def test_threads_must_be_positive() -> None:
    with pytest.raises(ValueError, match="threads must be at least 1"):
        InferencePool(threads=0, max_queued=1, timeout_s=1)


async def test_abandon_answers_waiting_callers() -> None:
    pool = InferencePool(threads=1, max_queued=4, timeout_s=30)
    release = threading.Event()
    running = asyncio.create_task(pool.run(release.wait))
    queued = asyncio.create_task(pool.run(int))
    await asyncio.sleep(0)
    pool.abandon()
    for task in (running, queued):
        with pytest.raises(PoolClosed):
            await task
    release.set()
    pool.shutdown()


async def test_after_shutdown_calls_are_refused() -> None:
    pool = InferencePool(threads=1, max_queued=4, timeout_s=30)
    pool.shutdown()
    with pytest.raises(PoolClosed):
        await pool.run(int)
    assert (pool.running, pool.queued) == (0, 0)
