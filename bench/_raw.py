"""The limit: ``session.run`` called in-process, one thread, no HTTP and no JSON."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class RawResult:
    """Per-call time of ``session.run`` on the sample, single thread."""

    calls: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    calls_per_s: float

    def as_dict(self) -> dict[str, float | int]:
        """Plain values for JSON output."""
        return asdict(self)


def measure_session(model_path: Path, rows: list[list[float]], duration_s: float) -> RawResult:
    """Call ``session.run`` back to back for ``duration_s`` (after a short warm-up) and time each call.

    The session uses onnxruntime's default options, like the benchmark's entry script.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    feeds = {session.get_inputs()[0].name: np.asarray(rows, dtype=np.float32)}
    for _ in range(50):
        session.run(None, feeds)
    times: list[int] = []
    clock = time.perf_counter_ns
    end = clock() + int(duration_s * 1e9)
    started = clock()
    while True:
        t0 = clock()
        session.run(None, feeds)
        t1 = clock()
        times.append(t1 - t0)
        if t1 >= end:
            break
    elapsed_s = (clock() - started) / 1e9
    ms = np.asarray(times, dtype=np.float64) / 1e6
    return RawResult(
        calls=len(times),
        p50_ms=round(float(np.percentile(ms, 50)), 4),
        p99_ms=round(float(np.percentile(ms, 99)), 4),
        mean_ms=round(float(ms.mean()), 4),
        calls_per_s=round(len(times) / elapsed_s, 1),
    )
