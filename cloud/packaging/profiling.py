"""``edgectl model profile``: measure a module image locally and recommend its resources.

The image runs in a container (no limits) with port 5001 on a free loopback port. After a short
warm-up, ``requests`` POSTs of the sample go to ``/score`` from ``concurrency`` client threads;
latency is measured per request. Docker's stats API gives the container's CPU time (before and
after: the average) and samples during the run (the peak), and its peak memory.

The recommendation leaves head-room: CPUs = peak cores x 1.25 rounded up to a quarter core;
memory = peak x 1.5 rounded up to 16 MB, at least 64 MB.
"""

from __future__ import annotations

import http.client
import math
import statistics
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import docker

from cloud.packaging import engine
from cloud.packaging.errors import InputError, PackagingError
from cloud.packaging.progress import LinePrinter, Progress
from cloud.packaging.smoke import remove_container, start_module, wait_ready

WARMUP_REQUESTS = 5


@dataclass(frozen=True)
class ProfileReport:
    """What profiling measured and what it recommends."""

    image: str
    requests: int
    concurrency: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    throughput_rps: float
    cpu_avg_cores: float
    cpu_peak_cores: float
    memory_peak_mb: float
    recommended_cpus: float
    recommended_memory_mb: int

    def manifest_snippet(self) -> str:
        """The ``resources`` block for a deployment manifest."""
        return f"resources:\n  cpus: {self.recommended_cpus}\n  memory_mb: {self.recommended_memory_mb}\n"


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by linear interpolation; values need not be sorted."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def recommend(cpu_peak_cores: float, memory_peak_mb: float) -> tuple[float, int]:
    """``(cpus, memory_mb)`` with head-room (see the module docstring)."""
    cpus = max(0.25, math.ceil(cpu_peak_cores * 1.25 * 4) / 4)
    memory = max(64, math.ceil(memory_peak_mb * 1.5 / 16) * 16)
    return cpus, memory


def _cpu_ns(stats: Mapping[str, Any]) -> int:
    return int(((stats.get("cpu_stats") or {}).get("cpu_usage") or {}).get("total_usage") or 0)


def _memory_mb(stats: Mapping[str, Any]) -> tuple[float, float]:
    """``(current, peak)`` memory in MB: usage without page cache; peak from cgroup v1 max_usage."""
    mem = stats.get("memory_stats") or {}
    details = mem.get("stats") or {}
    cache = details.get("inactive_file", details.get("total_inactive_file", details.get("cache", 0)))
    usage = max(0, int(mem.get("usage") or 0) - int(cache or 0))
    peak = max(usage, int(mem.get("max_usage") or 0) - int(cache or 0))
    return usage / 1e6, peak / 1e6


class _StatsSampler(threading.Thread):
    """Follows the container's stats stream: peak CPU cores between samples and peak memory."""

    def __init__(self, container: Any) -> None:
        super().__init__(daemon=True)
        self.container = container
        self.cpu_peak = 0.0
        self.mem_peak = 0.0
        self.stop_event = threading.Event()

    def run(self) -> None:
        last: tuple[int, float] | None = None
        try:
            for stats in self.container.stats(stream=True, decode=True):
                now = time.monotonic()
                cpu = _cpu_ns(stats)
                if last is not None and now > last[1]:
                    self.cpu_peak = max(self.cpu_peak, (cpu - last[0]) / 1e9 / (now - last[1]))
                last = (cpu, now)
                self.mem_peak = max(self.mem_peak, _memory_mb(stats)[1])
                if self.stop_event.is_set():
                    return
        except docker.errors.APIError:
            return


def _load(port: int, body: bytes, count: int, concurrency: int) -> tuple[list[float], int]:
    """POST ``body`` to /score ``count`` times from ``concurrency`` threads; latencies (ms) and errors."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    remaining = [count]

    def worker() -> None:
        nonlocal errors
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        headers = {"Content-Type": "application/json"}
        try:
            while True:
                with lock:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                start = time.perf_counter()
                try:
                    conn.request("POST", "/score", body=body, headers=headers)
                    resp = conn.getresponse()
                    resp.read()
                    ok = resp.status == 200
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                    ok = False
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    if ok:
                        latencies.append(elapsed)
                    else:
                        errors += 1
        finally:
            conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors


def profile_image(
    image: str,
    sample: bytes,
    *,
    requests: int = 200,
    concurrency: int = 1,
    client: docker.DockerClient | None = None,
    progress: Progress | None = None,
    timeout_s: float = 120.0,
) -> ProfileReport:
    """Run ``image`` locally, score ``sample`` ``requests`` times and report latency and resources."""
    out = progress or LinePrinter()
    if requests < 1 or concurrency < 1:
        raise InputError("--requests and --concurrency must be at least 1")
    docker_client = engine.connect(client)
    if engine.find_image(docker_client, image) is None:
        out.step(f"pulling {image}")
        engine.pull(docker_client, image, out)
    what = f"profiling {image}"
    container = start_module(docker_client, image, what)
    try:
        port = wait_ready(container, image, timeout_s)
        status, body = _probe(port, sample)
        if status != 200:
            raise InputError(f"the sample is not accepted: POST /score answered {status}: {body[:200]}")
        _load(port, sample, WARMUP_REQUESTS, 1)
        sampler = _StatsSampler(container)
        sampler.start()
        before = container.stats(stream=False)
        started = time.monotonic()
        out.step(f"sending {requests} requests ({concurrency} at a time)")
        latencies, errors = _load(port, sample, requests, concurrency)
        wall = time.monotonic() - started
        after = container.stats(stream=False)
        sampler.stop_event.set()
        sampler.join(timeout=3)
    finally:
        remove_container(container)
    if not latencies:
        raise PackagingError(f"every one of {requests} requests failed")
    cpu_avg = (_cpu_ns(after) - _cpu_ns(before)) / 1e9 / wall
    cpu_peak = max(sampler.cpu_peak, cpu_avg)
    mem_peak = max(sampler.mem_peak, _memory_mb(after)[1])
    cpus, memory = recommend(cpu_peak, mem_peak)
    return ProfileReport(
        image=image,
        requests=requests,
        concurrency=concurrency,
        errors=errors,
        p50_ms=statistics.median(latencies),
        p90_ms=percentile(latencies, 90),
        p99_ms=percentile(latencies, 99),
        throughput_rps=len(latencies) / wall,
        cpu_avg_cores=cpu_avg,
        cpu_peak_cores=cpu_peak,
        memory_peak_mb=mem_peak,
        recommended_cpus=cpus,
        recommended_memory_mb=memory,
    )


def _probe(port: int, sample: bytes) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/score", body=sample, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()
