"""Module health probes: liveness, readiness, latency and the execution provider, as data.

``HealthProber.check`` is called on every agent tick with the modules that run now
(``ProbeTarget``: where each answers, its ``HealthCheck`` and when it started). It probes those
whose ``interval_s`` has passed, concurrently over one shared aiohttp session, and returns the
latest ``HealthResult`` of every target: the contract's ``ModuleHealth``, the number of
consecutive failed liveness probes (what ``ObservedModule.health_failures`` carries to the
planner) and the execution provider the module reports. A new start (``started_at`` changed)
resets the failure count and reads the provider again, once the module is ready: from the
``scoring_execution_provider_info`` series of ``GET /metrics``, else from
``GET /v2/models/{module}`` (``parameters.execution_provider``).

A probe fails when the liveness path does not answer 2xx within ``timeout_s``; readiness is
reported separately (503 with a reason while the model loads) and never counts as a failure.
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

import aiohttp

from modules.contract import HealthCheck, ModuleHealth, utcnow

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


@dataclass(frozen=True)
class HealthResult:
    """The last probe of a module, its consecutive liveness failures and its execution provider."""

    health: ModuleHealth
    failures: int = 0
    execution_provider: str | None = None


@dataclass
class _Track:
    started_at: datetime | None
    probed_at: float | None = None
    result: HealthResult | None = None
    provider_read: bool = False


def _reason(body: Any) -> str | None:
    if isinstance(body, dict):
        for key in ("reason", "error", "message"):
            if isinstance(body.get(key), str):
                return str(body[key])
    return None


class HealthProber:
    """Probes modules over one aiohttp session (``async with HealthProber() as prober``)."""

    def __init__(
        self, session: aiohttp.ClientSession | None = None, clock: Callable[[], float] = time.monotonic
    ):
        """``session``: share one (the prober then leaves it open); ``clock``: monotonic seconds."""
        self._session = session
        self._own_session = session is None
        self._clock = clock
        self._tracks: dict[str, _Track] = {}

    async def __aenter__(self) -> HealthProber:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            # A fresh connection per probe: a kept-alive socket to a module that restarted would
            # fail once and count as a failed probe.
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=64))
        return self._session

    async def close(self) -> None:
        """Close the session when the prober created it."""
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(self, url: str, timeout_s: float) -> tuple[int, bytes]:
        async with self._client().get(
            url, timeout=aiohttp.ClientTimeout(total=timeout_s), allow_redirects=False
        ) as response:
            return response.status, await response.read()

    async def probe(self, base_url: str, check: HealthCheck) -> ModuleHealth:
        """One liveness probe (``check.path``) and, when live, one readiness probe (``check.ready_path``)."""
        checked_at = utcnow()
        started = time.perf_counter()
        error = await self._probe_error(base_url + check.path, check.timeout_s, "liveness")
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        if error is not None:
            return ModuleHealth(live=False, ready=False, latency_ms=None, checked_at=checked_at, error=error)
        ready_error = await self._probe_error(base_url + check.ready_path, check.timeout_s, "readiness")
        return ModuleHealth(
            live=True,
            ready=ready_error is None,
            latency_ms=latency_ms,
            checked_at=checked_at,
            error=ready_error,
        )

    async def _probe_error(self, url: str, timeout_s: float, what: str) -> str | None:
        """None when ``GET url`` answers 2xx in time, else why not."""
        try:
            status, body = await self._get(url, timeout_s)
        except asyncio.TimeoutError:
            return f"{what} GET {url}: no answer within {timeout_s:g} s"
        except aiohttp.ClientError as exc:
            return f"{what} GET {url}: {type(exc).__name__}: {exc}"
        if 200 <= status < 300:
            return None
        try:
            reason = _reason(json.loads(body))
        except ValueError:
            reason = None
        return f"{what} GET {url}: HTTP {status}" + (f" ({reason})" if reason else "")

    async def execution_provider(self, base_url: str, module: str, timeout_s: float = 2.0) -> str | None:
        """The execution provider(s) the module runs on (comma-separated when its models differ), or None."""
        try:
            status, body = await self._get(base_url + "/metrics", timeout_s)
            if status == 200:
                found = sorted(set(_PROVIDER_RE.findall(body.decode("utf-8", errors="replace"))) - _UNKNOWN)
                if found:
                    return ",".join(found)
            status, body = await self._get(f"{base_url}/v2/models/{module}", timeout_s)
        except (asyncio.TimeoutError, aiohttp.ClientError):
            return None
        if status != 200:
            return None
        try:
            provider = json.loads(body).get("parameters", {}).get("execution_provider")
        except (ValueError, AttributeError):
            return None
        return provider if isinstance(provider, str) and provider not in _UNKNOWN else None

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
                track = self._tracks[name] = _Track(started_at=target.started_at)
            if track.probed_at is None or now - track.probed_at >= target.check.interval_s:
                track.probed_at = now
                due.append(target)
        results = await asyncio.gather(*(self._check_one(t) for t in due))
        for target, result in zip(due, results, strict=True):
            self._tracks[target.module].result = result
        return {name: track.result for name, track in self._tracks.items() if track.result is not None}

    async def _check_one(self, target: ProbeTarget) -> HealthResult:
        track = self._tracks[target.module]
        previous = track.result
        health = await self.probe(target.base_url, target.check)
        failures = 0 if health.live else (previous.failures if previous else 0) + 1
        provider = previous.execution_provider if previous else None
        if health.ready and not track.provider_read:
            track.provider_read = True  # once per start: an entry script may never name one
            provider = await self.execution_provider(target.base_url, target.module, target.check.timeout_s)
        return HealthResult(health=health, failures=failures, execution_provider=provider)
