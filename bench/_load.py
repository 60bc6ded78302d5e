"""Load generation with ``wrk`` (a separate process) and the figures it reports.

A generated Lua script POSTs a fixed JSON body and, in wrk's ``done()`` hook, prints one line
``BENCH_JSON {...}`` with request counts, errors and latency percentiles in microseconds.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

_MARK = "BENCH_JSON "

_DONE_HOOK = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"connect":%d,"read":%d,"write":%d,"status":%d,'
    .. '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
"""


class LoadError(RuntimeError):
    """wrk is missing or did not report figures."""


@dataclass(frozen=True)
class LoadResult:
    """One load point: ``concurrency`` connections for ``duration_s`` seconds."""

    concurrency: int
    duration_s: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    http_errors: int
    """Responses with HTTP status >= 400 (wrk's ``errors.status``)."""
    socket_errors: int
    """Connect, read, write errors and timeouts."""

    def as_dict(self) -> dict[str, float | int]:
        """Plain values for JSON output."""
        return asdict(self)


def wrk_path() -> str:
    """The ``wrk`` binary; LoadError naming the package when it is missing."""
    path = shutil.which("wrk")
    if path is None:
        raise LoadError("wrk is not installed (Debian package 'wrk': apt-get install wrk)")
    return path


def wrk_version() -> str:
    """wrk's version line, e.g. ``wrk debian/4.1.0-3+b2 [epoll]``."""
    out = subprocess.run([wrk_path(), "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).splitlines()[0].split(" Copyright")[0].strip()


def lua_script(body: bytes, content_type: str = "application/json") -> str:
    """A wrk script that POSTs ``body`` and prints the figures as JSON when done."""
    text = body.decode()
    level = 1
    while f"]{'=' * level}]" in text:
        level += 1
    eq = "=" * level
    return (
        'wrk.method = "POST"\n'
        f'wrk.headers["Content-Type"] = "{content_type}"\n'
        f"wrk.body = [{eq}[{text}]{eq}]\n" + _DONE_HOOK
    )


def parse_report(stdout: str, concurrency: int) -> LoadResult:
    """Read the ``BENCH_JSON`` line wrk printed; LoadError when there is none."""
    line = next((ln for ln in stdout.splitlines() if ln.startswith(_MARK)), None)
    if line is None:
        raise LoadError(f"wrk printed no {_MARK.strip()} line; its output was:\n{stdout.strip()}")
    r = json.loads(line[len(_MARK) :])
    duration_s = r["duration_us"] / 1e6
    requests = int(r["requests"])
    return LoadResult(
        concurrency=concurrency,
        duration_s=round(duration_s, 3),
        requests=requests,
        rps=round(requests / duration_s, 1) if duration_s > 0 else 0.0,
        p50_ms=r["p50_us"] / 1000,
        p90_ms=r["p90_us"] / 1000,
        p99_ms=r["p99_us"] / 1000,
        max_ms=r["max_us"] / 1000,
        http_errors=int(r["status"]),
        socket_errors=int(r["connect"] + r["read"] + r["write"] + r["timeout"]),
    )


def run_wrk(
    url: str,
    body: bytes,
    *,
    concurrency: int,
    duration_s: float,
    threads: int = 1,
    timeout_s: float = 10.0,
) -> LoadResult:
    """POST ``body`` to ``url`` over ``concurrency`` keep-alive connections for ``duration_s``."""
    if not url.startswith(("http://127.0.0.1:", "http://localhost:", "http://[::1]:")):
        raise LoadError(f"load is only generated against loopback, not {url}")
    threads = max(1, min(threads, concurrency))
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        script = Path(tmp) / "post.lua"
        script.write_text(lua_script(body))
        cmd = [
            wrk_path(),
            f"-t{threads}",
            f"-c{concurrency}",
            f"-d{max(1, round(duration_s))}s",
            f"--timeout={max(1, round(timeout_s))}s",
            "-s",
            str(script),
            url,
        ]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=duration_s + timeout_s + 30)
    if done.returncode != 0:
        raise LoadError(f"wrk exited with {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return parse_report(done.stdout, concurrency)
