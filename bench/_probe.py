"""Health latency while one long request is in flight.

One thread POSTs ``{"sleep": busy_s}`` to an entry script that sleeps that long; meanwhile the
main thread sends health checks one after another and times each one that started while the long
request was still running. Everything is bounded by ``timeout_s``.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import asdict, dataclass

from bench._servers import RunningServer, http_get, http_post


@dataclass(frozen=True)
class ProbeResult:
    """Health checks answered during one long request."""

    busy_request_s: float
    busy_status: int
    probes: int
    health_median_ms: float
    health_max_ms: float
    health_failures: int

    def as_dict(self) -> dict[str, float | int]:
        """Plain values for JSON output."""
        return asdict(self)


def health_while_busy(server: RunningServer, busy_s: float = 2.0, timeout_s: float = 10.0) -> ProbeResult:
    """Time ``GET health_path`` while ``POST /score {"sleep": busy_s}`` is in flight."""
    outcome: dict[str, float | int] = {}

    def long_request() -> None:
        t0 = time.perf_counter()
        status, _ = http_post(server.url("/score"), f'{{"sleep": {busy_s}}}'.encode(), timeout_s + busy_s)
        outcome["status"] = status
        outcome["seconds"] = time.perf_counter() - t0

    worker = threading.Thread(target=long_request, daemon=True)
    worker.start()
    time.sleep(min(0.3, busy_s / 4))
    latencies: list[float] = []
    failures = 0
    deadline = time.monotonic() + busy_s + timeout_s
    while worker.is_alive() and time.monotonic() < deadline:
        t0 = time.perf_counter()
        status = http_get(server.url(server.spec.health_path), timeout_s=timeout_s)
        latencies.append((time.perf_counter() - t0) * 1000)
        failures += status != 200
        time.sleep(0.05)
    worker.join(timeout_s + busy_s)
    return ProbeResult(
        busy_request_s=round(float(outcome.get("seconds", float("nan"))), 3),
        busy_status=int(outcome.get("status", 0)),
        probes=len(latencies),
        health_median_ms=round(statistics.median(latencies), 2) if latencies else float("nan"),
        health_max_ms=round(max(latencies), 2) if latencies else float("nan"),
        health_failures=failures,
    )


class HealthSampler:
    """``GET health_path`` every ``interval_s`` from a thread while load runs; latencies in ms.

    Use as a context manager around a load point: it shows whether health checks stay prompt
    while the server is saturated (batches on the loop, busy workers).
    """

    def __init__(self, server: RunningServer, interval_s: float = 0.05, timeout_s: float = 10.0) -> None:
        self._server = server
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.latencies_ms: list[float] = []
        self.failures = 0

    def _sample(self) -> None:
        url = self._server.url(self._server.spec.health_path)
        while not self._stop.wait(self._interval_s):
            t0 = time.perf_counter()
            status = http_get(url, timeout_s=self._timeout_s)
            self.latencies_ms.append((time.perf_counter() - t0) * 1000)
            self.failures += status != 200

    def __enter__(self) -> HealthSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(self._timeout_s + 1)

    def summary(self) -> dict[str, float | int]:
        """Probes sent, median and max latency in ms, failures."""
        lat = self.latencies_ms
        return {
            "probes": len(lat),
            "median_ms": round(statistics.median(lat), 2) if lat else float("nan"),
            "max_ms": round(max(lat), 2) if lat else float("nan"),
            "failures": self.failures,
        }
