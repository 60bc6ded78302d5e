"""Adaptive batching: no-code ONNX models with a dynamic batch dimension, entry scripts with run_batch().

Requests that wait together run as one batch, like Triton's dynamic batcher and MLServer's
adaptive batching. The decision is ``plan``, a pure function of what waits and the time; the
``Batcher`` only does the threading around it:

- a batch holds requests whose inputs agree in everything but the batch dimension (same names,
  dtypes and other dimensions), oldest first, at most ``max_batch_size`` rows; a request larger
  than that runs alone;
- a batch starts as soon as it is full, or when its oldest request has waited
  ``max_batch_delay_ms``. With the default delay of 0 a batch starts as soon as the runner is
  free, with whatever waits: a lone request is never held back, and under load requests gather
  while the previous batch runs;
- when a batch fails, each of its requests is run on its own, so an error stays with the request
  that caused it.

While requests come one at a time, one that is cheap enough for the loop runs at once, in its
caller's task (``Batcher._run_lone``): a lone request never pays for the batching machinery. A
worker process with one CPU's share of threads can give such requests a session of their own with
every CPU's threads (``run_lone``), once ``LONE_STREAK`` requests in a row came alone.

Requests wait on the event loop, not in threads: only the batch itself runs in a thread, or on
the loop when batches have been measured to take less than a thread hand-over (``INLINE_RUN_S``;
``SOLE_CPU_INLINE_RUN_S`` in a process with one CPU, where a thread would not run beside the loop).
The Batcher is generic: ``tensor_batches`` joins ONNX feeds along the batch dimension and splits
the outputs; an entry script's ``run_batch()`` takes the request bodies as a list.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

from modules.contract import Batching
from modules.scoring.backends import TensorSpec
from modules.scoring.metrics import Histogram, MetricFamilies, label_value
from modules.scoring.pool import PoolBusy, PoolClosed, PoolTimeout

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
T = TypeVar("T")
R = TypeVar("R")
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

INLINE_RUN_S = 0.0001
"""Batches expected to run faster than this run on the event loop (a thread hand-over and the
loop's wake-up cost about as much on small machines); the loop is never held longer than that."""

LONE_STREAK = 8
"""A lone request goes to the batcher's ``run_lone`` runner (a session with every CPU's threads) only
after this many batches of one request in a row: requests that come one at a time, not a gap in load,
where the other workers need their CPUs."""

SOLE_CPU_INLINE_RUN_S = 0.005
"""The same bound for a process with one CPU to itself (a worker of ``SCORING_WORKERS`` = CPUs, or a
one-CPU device): a batch thread could not run beside the loop anyway, so batches run on the loop
unless expected to hold it longer than this (health checks then wait at most about that long)."""


def batchable(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> str | None:
    """None when a model can be batched, else why not (every tensor needs a dynamic first dimension)."""
    for kind, specs in (("input", inputs), ("output", outputs)):
        for spec in specs:
            if not spec.shape or spec.shape[0] is not None:
                shape = spec.shape_text()
                return f"{kind} {spec.name!r} has shape {shape}, without a dynamic batch dimension"
    return None


class Waiting(Protocol):
    """What ``plan`` needs to know of a waiting request."""

    @property
    def rows(self) -> int:
        """Rows in its batch dimension."""
        ...

    @property
    def key(self) -> Hashable:
        """Requests with equal keys can share a batch."""
        ...

    @property
    def arrived(self) -> float:
        """When it started waiting (the batcher's clock)."""
        ...


@dataclass(frozen=True, slots=True)
class Decision:
    """Run the requests at ``take`` (indices into the waiting list) now, or decide again at ``wake_at``."""

    take: tuple[int, ...]
    wake_at: float | None = None


def plan(waiting: Sequence[Waiting], now: float, max_rows: int, max_delay_s: float) -> Decision:
    """The next batch: the oldest request and the next ones that fit with it, when full or due.

    The batch is full when the next request that could join it would take it past ``max_rows``
    (or it has exactly ``max_rows``); it is due ``max_delay_s`` after its oldest request arrived.
    Neither: nothing runs yet and ``wake_at`` says when it is due.
    """
    if not waiting:
        return Decision(())
    head = waiting[0]
    take = [0]
    rows = head.rows
    full = rows >= max_rows
    for i in range(1, len(waiting)):
        if full:
            break
        other = waiting[i]
        if other.key != head.key:
            continue
        if rows + other.rows > max_rows:
            full = True
            break
        take.append(i)
        rows += other.rows
        full = rows >= max_rows
    due = head.arrived + max_delay_s
    if full or now >= due:
        return Decision(tuple(take))
    return Decision((), due)


def feeds_key(feeds: Feeds) -> tuple[Hashable, int]:
    """(batch key, rows) of a request; inputs that disagree on their batch size get a key of their own."""
    if len(feeds) == 1:  # the common case, without the sorting and the set
        [(name, a)] = feeds.items()
        if not a.ndim:
            return object(), 1
        return ((name, a.dtype.str, a.shape[1:]),), a.shape[0]
    sizes = {a.shape[0] if a.ndim else -1 for a in feeds.values()}
    if len(sizes) != 1 or -1 in sizes:
        return object(), 1  # the model will reject it; it runs alone and gets its own error
    key = tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(feeds.items()))
    return key, sizes.pop()


def tensor_batches(run: Callable[[Feeds], Feeds]) -> Callable[[list[Feeds]], list[Feeds]]:
    """A batch runner for a model: the requests' feeds joined along the batch dimension, one
    ``run``, every output split back into each request's rows."""

    def run_many(items: list[Feeds]) -> list[Feeds]:
        if len(items) == 1:
            return [run(items[0])]
        joined = {name: np.concatenate([f[name] for f in items]) for name in items[0]}
        # Requests share a batch only when their inputs agree on the batch size (``feeds_key``),
        # so any input's first dimension is a request's rows.
        return _split(run(joined), [next(iter(f.values())).shape[0] for f in items])

    return run_many


def one_row(_item: object) -> tuple[Hashable, int]:
    """The key of requests that are one row each and can all share a batch (entry scripts)."""
    return None, 1


class _Request(Generic[T, R]):
    __slots__ = ("arrived", "future", "item", "key", "rows", "timer")

    def __init__(self, item: T, key: Hashable, rows: int, arrived: float, future: asyncio.Future[R]):
        self.item = item
        self.key = key
        self.rows = rows
        self.arrived = arrived
        self.future = future
        self.timer: asyncio.TimerHandle | None = None
        """Its timeout, armed only once it waits beyond the loop pass it arrived in."""

    def arm(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        """Answer PoolTimeout ``timeout_s`` after arrival, unless answered before."""
        if self.timer is None:
            self.timer = loop.call_at(self.arrived + timeout_s, _expire, self.future)


Outcome = tuple[Any, BaseException | None]


class Batcher(Generic[T, R]):
    """Runs ``run_many`` (blocking: a list of requests in, one result per request out) on the
    batches ``plan`` forms; ``key`` gives a request's batch key and rows.

    Used from one event loop: requests wait on the loop (no thread per request), one batch at a
    time runs in the batcher's own thread, and its results come back with a single loop wake-up
    per batch. A batch whose expected run time (from the batches before it) is under ``inline_s``
    runs on the loop instead: for such small work the two thread hand-overs would cost more than
    the work (0: never, for code that must stay off the loop). At most ``max_queued`` requests
    wait (more get PoolBusy); a request not answered ``timeout_s`` after it arrived gets PoolTimeout (its rows
    still run if their batch started).
    """

    def __init__(
        self,
        run_many: Callable[[list[T]], list[R]],
        settings: Batching,
        *,
        name: str,
        key: Callable[[T], tuple[Hashable, int]],
        max_queued: int = 256,
        timeout_s: float = 60.0,
        inline_s: float = INLINE_RUN_S,
        run_lone: Callable[[T], R] | None = None,
    ) -> None:
        self._run_many = run_many
        self._run_lone_item = run_lone
        self._inline_s = inline_s
        self._key = key
        self.settings = settings
        self.name = name
        self.max_queued = max_queued
        self.timeout_s = timeout_s
        self._max_delay_s = settings.max_batch_delay_ms / 1000.0
        self._waiting: list[_Request[T, R]] = []
        self._busy = False
        self._soon = False
        self._lone = True
        """The last batch was one request: the next lone arrival runs at once (``_run_lone``)."""
        self._lone_streak = 0
        """Batches of one request in a row (``LONE_STREAK``)."""
        self._timer: asyncio.TimerHandle | None = None
        self._jobs: SimpleQueue[tuple[list[_Request[T, R]], asyncio.AbstractEventLoop] | None] = SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.costs = RowCost()
        """Seconds per row, learnt from the batches run so far."""
        self.sizes = Histogram(BATCH_SIZE_BUCKETS)
        """Rows per batch run."""
        self.split_batches = 0
        """Batches that failed and were run request by request."""
        self.inline_batches = 0
        """Batches run on the loop because they were expected to take under ``INLINE_RUN_S``."""

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return len(self._waiting)

    async def infer(self, item: T) -> R:
        """Run ``item`` as part of a batch and return its own result."""
        if self._closed:
            raise PoolClosed()
        if len(self._waiting) >= self.max_queued:
            raise PoolBusy()
        loop = asyncio.get_running_loop()
        key, rows = self._key(item)
        future: asyncio.Future[R] = loop.create_future()
        request = _Request(item, key, rows, loop.time(), future)
        if (
            self._lone
            and not self._soon
            and not self._busy
            and not self._waiting
            and self.costs.expected(rows) < self._inline_s
        ):
            return self._run_lone(request, loop)
        self._waiting.append(request)
        if not self._soon:
            # Decide after the handlers already woken in this loop iteration have queued theirs:
            # requests that arrived together then run together, even when a batch is cheap
            # enough to run on the loop at once.
            self._soon = True
            loop.call_soon(self._dispatch, loop)
        try:
            return await future
        finally:
            if request.timer is not None:
                request.timer.cancel()
            if future.cancelled() or future.exception() is not None:
                self._waiting = [r for r in self._waiting if r.future is not future]

    def _run_lone(self, request: _Request[T, R], loop: asyncio.AbstractEventLoop) -> R:
        """Run a request at once on the loop: while requests come one at a time (the last batch
        was a single request), the first one of a loop pass does not wait for the next pass.
        The requests after it in the same pass wait and form the next batch as usual, so load
        turns batching back on."""
        self._soon = True
        loop.call_soon(self._dispatch, loop)
        self.sizes.observe(request.rows)
        self.inline_batches += 1
        self._lone_streak += 1
        [(result, error)], _ = self._run_batch([request])
        if error is not None:
            raise error
        return result

    def _dispatch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start batches while the runner is free and ``plan`` says so; arm the timeouts of the
        requests that still wait (a request answered in the pass after its arrival never needs
        one: a loop timer costs about as much as a small model's run)."""
        self._soon = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        try:
            self._start_batches(loop)
        finally:  # also when something failed unexpectedly: the rest must not wait forever
            for request in self._waiting:
                request.arm(loop, self.timeout_s)

    def _start_batches(self, loop: asyncio.AbstractEventLoop) -> None:
        while not self._busy and not self._closed:
            self._waiting = [r for r in self._waiting if not r.future.done()]
            if not self._waiting:
                return
            now = loop.time()
            decision = plan(self._waiting, now, self.settings.max_batch_size, self._max_delay_s)
            if not decision.take:
                assert decision.wake_at is not None
                self._timer = loop.call_at(decision.wake_at, self._dispatch, loop)
                return
            taken = set(decision.take)
            batch = [self._waiting[i] for i in decision.take]
            self._waiting = [r for i, r in enumerate(self._waiting) if i not in taken]
            rows = sum(r.rows for r in batch)
            self.sizes.observe(rows)
            self._lone = len(batch) == 1
            self._lone_streak = self._lone_streak + 1 if self._lone else 0
            if self.costs.expected(rows) < self._inline_s:
                self.inline_batches += 1
                self._settle(batch, *self._run_batch(batch))
                continue
            try:
                self._start_thread()
            except RuntimeError as exc:  # "can't start new thread": answer now, try again next batch
                log.error("model %s: cannot start the batch thread: %s", self.name, exc)
                failure = RuntimeError(f"model {self.name}: cannot start the batch thread: {exc}")
                self._settle(batch, [(None, failure)] * len(batch), False)
                continue
            self._busy = True
            for request in batch:
                request.arm(loop, self.timeout_s)
            self._jobs.put((batch, loop))

    def _start_thread(self) -> None:
        """Start the batch thread unless it runs; RuntimeError when it cannot start (left unset,
        so the next batch tries again)."""
        if self._thread is not None:
            return
        thread = threading.Thread(target=self._work, name=f"batch_{self.name}", daemon=True)
        thread.start()
        self._thread = thread

    def _finished(self, batch: list[_Request[T, R]], outcomes: list[Outcome], split: bool) -> None:
        """On the loop, when a batch is back from the thread: answer it, start the next one."""
        self._busy = False
        self._settle(batch, outcomes, split)
        self._dispatch(asyncio.get_running_loop())

    def _settle(self, batch: list[_Request[T, R]], outcomes: list[Outcome], split: bool) -> None:
        self.split_batches += split
        for request, (result, error) in zip(batch, outcomes, strict=True):
            if request.future.done():  # timed out meanwhile
                continue
            if error is not None:
                request.future.set_exception(error)
            else:
                request.future.set_result(result)

    def close(self) -> None:
        """Answer waiting requests with PoolClosed and let the batch thread end."""
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        for request in self._waiting:
            if not request.future.done():
                request.future.set_exception(PoolClosed())
        self._waiting = []
        self._jobs.put(None)

    def _work(self) -> None:
        """The batch thread: run each batch handed over, send the outcomes back to the loop."""
        while (job := self._jobs.get()) is not None:
            batch, loop = job
            outcomes, split = self._run_batch(batch)
            with contextlib.suppress(RuntimeError):  # the loop has closed
                loop.call_soon_threadsafe(self._finished, batch, outcomes, split)
            del job, batch, loop, outcomes

    def _run_batch(self, batch: list[_Request[T, R]]) -> tuple[list[Outcome], bool]:
        """Outcomes of one batch; a failed batch is run request by request (True: it was split).
        A batch of one request after a streak of them goes to ``run_lone`` when there is one."""
        items = [r.item for r in batch]
        lone = self._run_lone_item if len(items) == 1 and self._lone_streak > LONE_STREAK else None
        started = time.perf_counter()
        try:
            results = self._run_many(items) if lone is None else [lone(items[0])]
            if len(results) != len(items):
                raise ValueError(f"{len(results)} results for a batch of {len(items)} requests")
        except Exception as exc:
            if len(items) == 1:
                return [(None, exc)], False
            log.warning(
                "model %s: a batch of %d requests failed (%s); running them one by one",
                self.name,
                len(items),
                exc,
            )
            return [self._run_alone(item) for item in items], True
        self.costs.observe(sum(r.rows for r in batch), time.perf_counter() - started)
        return [(result, None) for result in results], False

    def _run_alone(self, item: T) -> Outcome:
        try:
            [result] = self._run_many([item])
            return result, None
        except Exception as exc:
            return None, exc

    def size_lines(self) -> list[str]:
        """Prometheus sample lines of ``scoring_batch_size`` for this model."""
        return self.sizes.render("scoring_batch_size", f'model="{label_value(self.name)}"')


def batch_metric_families(batchers: Sequence[Batcher[Any, Any]]) -> MetricFamilies:
    """``/metrics`` families of these batchers: rows per batch, requests waiting, split batches."""
    if not batchers:
        return {}

    def per_model(metric: str, value: Callable[[Batcher[Any, Any]], int]) -> Callable[[], list[str]]:
        return lambda: [f'{metric}{{model="{label_value(b.name)}"}} {value(b)}' for b in batchers]

    return {
        "scoring_batch_size": (
            "histogram",
            "Rows per batch run, by model.",
            lambda: [line for b in batchers for line in b.size_lines()],
        ),
        "scoring_batch_queued": (
            "gauge",
            "Requests waiting for a batch, by model.",
            per_model("scoring_batch_queued", lambda b: b.queued),
        ),
        "scoring_batch_splits_total": (
            "counter",
            "Batches that failed and were run request by request, by model.",
            per_model("scoring_batch_splits_total", lambda b: b.split_batches),
        ),
    }


class RowCost:
    """What a row costs, from recent batches: a moving average of seconds per row.

    Small batches carry the most fixed cost per row, so the figure errs on the slow side (work
    then goes to the thread). Until ``WARM_UP`` batches were measured, every batch counts as slow.
    """

    WARM_UP = 16
    _ALPHA = 0.1

    def __init__(self) -> None:
        self.batches = 0
        self.per_row_s = 0.0

    def observe(self, rows: int, seconds: float) -> None:
        """Record one batch of ``rows`` that took ``seconds``."""
        per_row = seconds / max(1, rows)
        self.per_row_s = (
            per_row if self.batches == 0 else self.per_row_s + self._ALPHA * (per_row - self.per_row_s)
        )
        self.batches += 1

    def expected(self, rows: int) -> float:
        """Expected seconds for a batch of ``rows`` (infinite while still warming up)."""
        if self.batches < self.WARM_UP:
            return float("inf")
        return rows * self.per_row_s


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(PoolTimeout())


def _split(outputs: Feeds, rows: list[int]) -> list[Feeds]:
    """Each request's rows of every output, in order; ValueError when an output lost the batch size."""
    total = sum(rows)
    spans = []
    start = 0
    for n in rows:
        spans.append((start, start + n))
        start += n
    parts: list[Feeds] = [{} for _ in rows]
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise ValueError(f"output {name!r} has {array.shape[0] if array.ndim else 0} rows, not {total}")
        for part, (begin, end) in zip(parts, spans, strict=True):
            part[name] = array[begin:end]
    return parts
