"""Adaptive batching for no-code ONNX models with a dynamic batch dimension.

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

Callers are the inference pool's worker threads: ``infer`` blocks until its rows come back.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from modules.contract import Batching
from modules.scoring.backends import InferenceError, TensorSpec
from modules.scoring.metrics import Histogram, label_value

log = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


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
    sizes = {a.shape[0] if a.ndim else -1 for a in feeds.values()}
    if len(sizes) != 1 or -1 in sizes:
        return object(), 1  # the model will reject it; it runs alone and gets its own error
    key = tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(feeds.items()))
    return key, sizes.pop()


class _Request:
    __slots__ = ("arrived", "done", "error", "feeds", "key", "result", "rows")

    def __init__(self, feeds: Feeds, key: Hashable, rows: int, arrived: float) -> None:
        self.feeds = feeds
        self.key = key
        self.rows = rows
        self.arrived = arrived
        self.result: Feeds | None = None
        self.error: BaseException | None = None
        self.done = threading.Lock()
        self.done.acquire()

    def settle(self, result: Feeds | None, error: BaseException | None) -> None:
        self.result, self.error = result, error
        self.done.release()


class Batcher:
    """Runs ``run`` (a backend's blocking ``infer``) on batches formed by ``plan``, in one thread."""

    def __init__(
        self,
        run: Callable[[Feeds], Feeds],
        settings: Batching,
        *,
        name: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._run = run
        self.settings = settings
        self.name = name
        self._clock = clock
        self._max_delay_s = settings.max_batch_delay_ms / 1000.0
        self._waiting: list[_Request] = []
        self._changed = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self.sizes = Histogram(BATCH_SIZE_BUCKETS)
        """Rows per batch run (written by the batch thread only)."""
        self.split_batches = 0
        """Batches that failed and were run request by request."""

    def infer(self, feeds: Feeds) -> Feeds:
        """Run ``feeds`` as part of a batch; blocks until its own outputs are back."""
        key, rows = feeds_key(feeds)
        request = _Request(feeds, key, rows, self._clock())
        with self._changed:
            if self._closed:
                raise InferenceError(f"model {self.name}: the server is shutting down")
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=f"batch_{self.name}", daemon=True)
                self._thread.start()
            self._waiting.append(request)
            self._changed.notify()
        request.done.acquire()
        if request.error is not None:
            raise request.error
        assert request.result is not None
        return request.result

    def close(self) -> None:
        """Stop after the requests already waiting have run."""
        with self._changed:
            self._closed = True
            self._changed.notify()

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run_batch(batch)

    def _next_batch(self) -> list[_Request] | None:
        with self._changed:
            while True:
                if not self._waiting:
                    if self._closed:
                        return None
                    self._changed.wait()
                    continue
                now = self._clock()
                waiting = self._waiting
                decision = plan(waiting, now, self.settings.max_batch_size, self._max_delay_s)
                if decision.take:
                    taken = set(decision.take)
                    self._waiting = [r for i, r in enumerate(waiting) if i not in taken]
                    return [waiting[i] for i in decision.take]
                assert decision.wake_at is not None
                self._changed.wait(max(0.0, decision.wake_at - now))

    def _run_batch(self, batch: list[_Request]) -> None:
        rows = sum(r.rows for r in batch)
        self.sizes.observe(rows)
        if len(batch) == 1:
            self._run_alone(batch[0])
            return
        names = batch[0].feeds.keys()
        try:
            joined = {name: np.concatenate([r.feeds[name] for r in batch]) for name in names}
            outputs = self._run(joined)
            parts = _split(outputs, [r.rows for r in batch])
        except Exception as exc:
            self.split_batches += 1
            log.warning(
                "model %s: a batch of %d requests failed (%s); running them one by one",
                self.name,
                len(batch),
                exc,
            )
            for request in batch:
                self._run_alone(request)
            return
        for request, part in zip(batch, parts, strict=True):
            request.settle(part, None)

    def _run_alone(self, request: _Request) -> None:
        try:
            request.settle(self._run(request.feeds), None)
        except BaseException as exc:
            request.settle(None, exc)

    def size_lines(self) -> list[str]:
        """Prometheus sample lines of ``scoring_batch_size`` for this model."""
        return self.sizes.render("scoring_batch_size", f'model="{label_value(self.name)}"')

    def split_line(self) -> str:
        """The Prometheus sample line of ``scoring_batch_splits_total`` for this model."""
        return f'scoring_batch_splits_total{{model="{label_value(self.name)}"}} {self.split_batches}'


def _split(outputs: Feeds, rows: list[int]) -> list[Feeds]:
    """Each request's rows of every output, in order; ValueError when an output lost the batch size."""
    total = sum(rows)
    bounds = np.cumsum(rows)[:-1]
    parts: list[Feeds] = [{} for _ in rows]
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != total:
            raise ValueError(f"output {name!r} has {array.shape[0] if array.ndim else 0} rows, not {total}")
        for part, piece in zip(parts, np.split(array, bounds), strict=True):
            part[name] = piece
    return parts
