"""Module health probes: liveness, readiness, latency and the execution provider, as data.

``HealthProber.check`` is called on every agent tick with the modules that run now
(``ProbeTarget``: where each answers, its ``HealthCheck`` and when it started). It probes those
whose ``interval_s`` has passed, concurrently, and returns the latest ``HealthResult`` of every
target: the contract's ``ModuleHealth``, the number of consecutive failed liveness probes that
count (what ``ObservedModule.health_failures`` carries to the planner) and the execution provider
the module reports. A new start (``started_at`` changed) resets the count and reads the provider
again, once the module is ready: from the ``scoring_execution_provider_info`` series of
``GET /metrics``, else from ``GET /v2/models/{module}`` (``parameters.execution_provider``).

A probe fails when the liveness path does not answer 2xx within ``timeout_s``, or when the answer
does not come from the instance the runtime started (``ProbeTarget.instance``, echoed by the
scoring server in the ``X-Edge-Instance`` header): another server holding the module's port is
never taken for the module. Readiness is reported separately (503 with a reason while the model
loads) and never counts as a failure.

Start period (Docker's ``HEALTHCHECK --start-period``, Kubernetes' startup probe): after a start,
failed liveness probes are not counted until the module has answered one once, or until
``start_period_s`` has passed since it started, whichever comes first. A module whose process
needs longer than ``failure_threshold * interval_s`` to listen (a large model, a slow import) is
therefore not restarted while it starts; one that was live and stops answering is counted at
once. A module whose initialisation fails exits by itself (the scoring server exits 3).

Probes are plain HTTP/1.0 ``GET``s over asyncio streams, one fresh connection each (a kept-alive
socket to a module that restarted would fail once and count as a failure), so the agent needs
no HTTP client library for them.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from modules.contract import INSTANCE_HEADER, HealthCheck, ModuleHealth, utcnow

DEFAULT_START_PERIOD_S = 120.0
MAX_BODY_BYTES = 1024 * 1024
"""The most of a response body a probe reads (readiness reasons, metrics, model metadata)."""
USER_AGENT = "edge-agent"

_PROVIDER_RE = re.compile(
    r'^scoring_execution_provider_info\{[^}]*provider="([^"]*)"[^}]*\}\s+1(?:\.0)?\s*$', re.M
)

_UNKNOWN = frozenset({"", "loading", "unknown"})
"""What modules say while they do not know their provider (loading, or an entry script that does not tell)."""


@dataclass(frozen=True)
class ProbeTarget:
    """A running module to probe: ``base_url`` is ``http://host:port`` of its ``check.port``."""

    module: str
    base_url: str
    check: HealthCheck = field(default_factory=HealthCheck)
    started_at: datetime | None = None
    instance: str | None = None
    """The instance id the module must echo (``X-Edge-Instance``); None accepts any answer."""


def probe_interval(check: HealthCheck, ready_seen: bool) -> float:
    """Seconds between probes: ``start_interval_s`` until the module was ready once since its start."""
    return check.interval_s if ready_seen else min(check.start_interval_s, check.interval_s)


@dataclass(frozen=True)
class HealthResult:
    """The last probe of a module, its counted liveness failures and its execution provider.

    ``failures``: consecutive failed liveness probes that count toward ``failure_threshold``;
    ``starting``: the module is in its start period (never live since it started, and the start
    period has not passed), so its failures are not counted yet.
    """

    health: ModuleHealth
    failures: int = 0
    execution_provider: str | None = None
    starting: bool = False


@dataclass(frozen=True)
class LivenessCount:
    """Liveness bookkeeping of one start: counted failures, start period, seen live since the start."""

    failures: int = 0
    starting: bool = True
    live_seen: bool = False


def count_probe(
    previous: LivenessCount, live: bool, since_start_s: float, start_period_s: float
) -> LivenessCount:
    """The count after one more liveness probe, ``since_start_s`` after the module started.

    A success resets the failures and ends the start period for good; a failure counts once the
    module was live since its start or ``start_period_s`` has passed, and is ignored before.
    """
    live_seen = previous.live_seen or live
    starting = not live_seen and since_start_s < start_period_s
    failures = 0 if live or starting else previous.failures + 1
    return LivenessCount(failures=failures, starting=starting, live_seen=live_seen)


class ProbeError(Exception):
    """A probe URL or an answer that is not usable HTTP."""


@dataclass(frozen=True)
class HttpAnswer:
    """What a probe's ``GET`` got: the status, the (possibly cut) body, the headers (names lower case)."""

    status: int
    body: bytes
    headers: dict[str, str]


async def http_get(
    url: str, timeout_s: float, *, max_body: int = MAX_BODY_BYTES, body_on_success: bool = True
) -> HttpAnswer:
    """``GET url`` (``http://`` only) over HTTP/1.0 on a fresh connection.

    The body is cut at ``max_body`` bytes, and not read at all for a 2xx answer when
    ``body_on_success`` is false (a liveness probe needs only the status). Raises
    ``asyncio.TimeoutError`` past ``timeout_s`` (connecting included), ``OSError`` when the
    connection fails and ``ProbeError`` when the URL or the answer is not usable.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ProbeError(f"not an http:// URL: {url!r}")
    try:
        port = parts.port or 80
    except ValueError as exc:
        raise ProbeError(f"bad port in {url!r}: {exc}") from None
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    request = f"GET {target} HTTP/1.0\r\nHost: {parts.netloc}\r\nUser-Agent: {USER_AGENT}\r\n\r\n"
    exchange = _exchange(parts.hostname, port, request.encode(), max_body, body_on_success)
    return await asyncio.wait_for(exchange, timeout_s)


async def _exchange(host: str, port: int, request: bytes, max_body: int, body_on_success: bool) -> HttpAnswer:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request)
        await writer.drain()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            raise ProbeError(
                f"the connection closed after {len(exc.partial)} bytes, before the headers ended"
            ) from None
        except asyncio.LimitOverrunError:
            raise ProbeError("response headers over 64 KiB") from None
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        version, _, rest = status_line.partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/") or not code.isdigit():
            raise ProbeError(f"not an HTTP response: {status_line[:80]!r}")
        status = int(code)
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            if name.strip():
                headers[name.strip().lower()] = value.strip()
        if 200 <= status < 300 and not body_on_success:
            return HttpAnswer(status, b"", headers)
        length = headers.get("content-length", "")
        limit = min(int(length), max_body) if length.isdigit() else max_body
        body = bytearray()
        while len(body) < limit and (chunk := await reader.read(limit - len(body))):
            body += chunk
        return HttpAnswer(status, bytes(body), headers)
    finally:
        writer.close()


@dataclass
class _Track:
    started_at: datetime | None
    start: float
    """When the module started, on the prober's clock."""
    probed_at: float | None = None
    result: HealthResult | None = None
    ready_seen: bool = False
    """Ready at least once since this start (then ``interval_s`` applies, before ``start_interval_s``)."""
    count: LivenessCount = field(default_factory=LivenessCount)
    provider_read: bool = False


def _reason(body: Any) -> str | None:
    if isinstance(body, dict):
        for key in ("reason", "error", "message"):
            if isinstance(body.get(key), str):
                return str(body[key])
    return None


class HealthProber:
    """Probes modules (``async with HealthProber() as prober``; ``close`` is kept for symmetry)."""

    def __init__(
        self,
        *,
        start_period_s: float = DEFAULT_START_PERIOD_S,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``start_period_s``: failures after a start count once the module was live, or after
        this long (0: from the first probe); ``clock``: monotonic seconds (tests move one by hand)."""
        if not start_period_s >= 0:
            raise ValueError(f"start_period_s must not be negative, got {start_period_s}")
        self.start_period_s = start_period_s
        self._clock = clock
        self._tracks: dict[str, _Track] = {}

    async def __aenter__(self) -> HealthProber:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Forget every module (probes hold no connection between calls)."""
        self._tracks.clear()

    async def probe(self, base_url: str, check: HealthCheck, instance: str | None = None) -> ModuleHealth:
        """One liveness probe (``check.path``) and, when live, one readiness probe (``check.ready_path``).

        With ``instance``, an answer that does not echo it (``X-Edge-Instance``) is not the module's.
        """
        checked_at = utcnow()
        started = time.perf_counter()
        error = await self._probe_error(base_url + check.path, check.timeout_s, "liveness", instance)
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        if error is not None:
            return ModuleHealth(live=False, ready=False, latency_ms=None, checked_at=checked_at, error=error)
        ready_error = await self._probe_error(
            base_url + check.ready_path, check.timeout_s, "readiness", instance
        )
        return ModuleHealth(
            live=True,
            ready=ready_error is None,
            latency_ms=latency_ms,
            checked_at=checked_at,
            error=ready_error,
        )

    async def _probe_error(self, url: str, timeout_s: float, what: str, instance: str | None) -> str | None:
        """None when ``GET url`` answers 2xx in time (from ``instance`` when given), else why not."""
        try:
            answer = await http_get(url, timeout_s, body_on_success=False)
        except asyncio.TimeoutError:
            return f"{what} GET {url}: no answer within {timeout_s:g} s"
        except (OSError, ProbeError) as exc:
            return f"{what} GET {url}: {type(exc).__name__}: {exc}"
        echoed = answer.headers.get(INSTANCE_HEADER.lower())
        if instance is not None and echoed != instance:
            who = f"instance {echoed}" if echoed else f"a server that sends no {INSTANCE_HEADER} header"
            return (
                f"{what} GET {url}: answered by {who}, not by the module's instance {instance} "
                "(another process holds the port?)"
            )
        if 200 <= answer.status < 300:
            return None
        try:
            reason = _reason(json.loads(answer.body))
        except ValueError:
            reason = None
        return f"{what} GET {url}: HTTP {answer.status}" + (f" ({reason})" if reason else "")

    async def execution_provider(self, base_url: str, module: str, timeout_s: float = 2.0) -> str | None:
        """The execution provider(s) the module runs on (comma-separated when its models differ), or None."""
        try:
            metrics = await http_get(base_url + "/metrics", timeout_s)
            if metrics.status == 200:
                text = metrics.body.decode("utf-8", errors="replace")
                found = sorted(set(_PROVIDER_RE.findall(text)) - _UNKNOWN)
                if found:
                    return ",".join(found)
            answer = await http_get(f"{base_url}/v2/models/{module}", timeout_s)
        except (asyncio.TimeoutError, OSError, ProbeError):
            return None
        if answer.status != 200:
            return None
        try:
            provider = json.loads(answer.body).get("parameters", {}).get("execution_provider")
        except (ValueError, AttributeError):
            return None
        return provider if isinstance(provider, str) and provider not in _UNKNOWN else None

    def _new_track(self, target: ProbeTarget) -> _Track:
        """A track for a new start, its start placed on the prober's clock (now when unknown)."""
        now = self._clock()
        if target.started_at is None:
            return _Track(started_at=None, start=now)
        ago_s = max(0.0, (utcnow() - target.started_at).total_seconds())
        return _Track(started_at=target.started_at, start=now - ago_s)

    async def check(self, targets: Iterable[ProbeTarget]) -> dict[str, HealthResult]:
        """Probe the targets that are due; the latest result of every target probed at least once."""
        by_name = {t.module: t for t in targets}
        for gone in self._tracks.keys() - by_name.keys():
            del self._tracks[gone]
        now = self._clock()
        due = []
        for name, target in by_name.items():
            track = self._tracks.get(name)
            if track is None or track.started_at != target.started_at:
                track = self._tracks[name] = self._new_track(target)
            if track.probed_at is None or now - track.probed_at >= probe_interval(
                target.check, track.ready_seen
            ):
                track.probed_at = now
                due.append(target)
        results = await asyncio.gather(*(self._check_one(t) for t in due))
        for target, result in zip(due, results, strict=True):
            track = self._tracks[target.module]
            track.result = result
            track.ready_seen = track.ready_seen or result.health.ready
        return {name: track.result for name, track in self._tracks.items() if track.result is not None}

    async def _check_one(self, target: ProbeTarget) -> HealthResult:
        track = self._tracks[target.module]
        previous = track.result
        health = await self.probe(target.base_url, target.check, target.instance)
        count = track.count = count_probe(
            track.count, health.live, self._clock() - track.start, self.start_period_s
        )
        if count.starting and health.error is not None:
            note = f" (starting: not counted until live or {self.start_period_s:g} s after the start)"
            health = health.model_copy(update={"error": health.error + note})
        provider = previous.execution_provider if previous else None
        if health.ready and not track.provider_read:
            track.provider_read = True  # once per start: an entry script may never name one
            provider = await self.execution_provider(target.base_url, target.module, target.check.timeout_s)
        return HealthResult(
            health=health, failures=count.failures, execution_provider=provider, starting=count.starting
        )
