"""The limit: ``session.run`` in-process, no HTTP and no JSON, at its best on these CPUs.

``measure_limit`` sweeps onnxruntime's thread settings and batch sizes and keeps the best
throughput (rows per second) and the best batch-1 latency:

- one caller, intra-op threads 1..CPUs, spinning on and off, batches of 1, 4, 16 and 64 rows;
- CPUs callers at once on one session with one intra-op thread each, batches of 1 and 16.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

BATCHES = (1, 4, 16, 64)
PARALLEL_BATCHES = (1, 16)


@dataclass(frozen=True)
class Point:
    """One setting of the sweep."""

    setting: str
    batch: int
    rows_per_s: float
    p50_ms: float


def _session(model_path: Path, threads: int, spin: bool) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def _one_caller(session: Any, feeds: dict[str, np.ndarray], duration_s: float) -> tuple[float, float]:
    """(calls per second, p50 ms) of back-to-back calls."""
    for _ in range(20):
        session.run(None, feeds)
    clock = time.perf_counter_ns
    times: list[int] = []
    started = clock()
    end = started + int(duration_s * 1e9)
    while (t0 := clock()) < end:
        session.run(None, feeds)
        times.append(clock() - t0)
    elapsed = (clock() - started) / 1e9
    return len(times) / elapsed, float(np.percentile(np.asarray(times) / 1e6, 50))


def _parallel(session: Any, feeds: dict[str, np.ndarray], callers: int, duration_s: float) -> float:
    """Calls per second of ``callers`` threads calling at once."""
    counts = [0] * callers
    stop = time.perf_counter() + duration_s

    def call(i: int) -> None:
        while time.perf_counter() < stop:
            session.run(None, feeds)
            counts[i] += 1

    threads = [threading.Thread(target=call, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / duration_s


def measure_limit(model_path: Path, sample: list[Any], cpus: int, point_s: float = 1.0) -> dict[str, Any]:
    """The sweep's every point, the best throughput and the best batch-1 latency."""
    item = np.asarray(sample, dtype=np.float32)
    points: list[Point] = []
    for threads in range(1, cpus + 1):
        for spin in (False, True):
            session = _session(model_path, threads, spin)
            inputs_name = session.get_inputs()[0].name
            for batch in BATCHES:
                feeds = {inputs_name: np.repeat(item, batch, axis=0)}
                calls, p50 = _one_caller(session, feeds, point_s)
                setting = f"1 caller, {threads} thread(s), spinning {'on' if spin else 'off'}"
                points.append(Point(setting, batch, round(calls * batch, 1), round(p50, 4)))
    if cpus > 1:
        session = _session(model_path, 1, False)
        inputs_name = session.get_inputs()[0].name
        for batch in PARALLEL_BATCHES:
            feeds = {inputs_name: np.repeat(item, batch, axis=0)}
            calls = _parallel(session, feeds, cpus, point_s)
            points.append(
                Point(f"{cpus} callers, 1 thread each", batch, round(calls * batch, 1), float("nan"))
            )
    best = max(points, key=lambda p: p.rows_per_s)
    fastest = min((p for p in points if p.batch == 1 and p.p50_ms == p.p50_ms), key=lambda p: p.p50_ms)
    return {
        "best": asdict(best),
        "batch1": asdict(fastest),
        "points": [asdict(p) for p in points],
    }
