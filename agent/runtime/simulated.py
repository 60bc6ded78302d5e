"""A module runtime that runs nothing: modules live in memory and follow a seeded random script.

``SimulatedRuntime`` implements ``ModuleRuntime`` for fleet simulations (``harness/simulate.py``)
and ``SimulatedProber`` answers the agent's health probes from it, so the agent's real loop,
planner, runner, rollout and rollback code drive simulated modules exactly as they drive
containers. Nothing runs in the background: every state is computed from the clock when observed
(a pull finishes, a module becomes ready or crashes at a time drawn when it started), so a
simulated device costs no timers and no tasks.

``SimulationSettings`` holds the script: how long pulls, starts and model loads take, how often a
started module crashes, how often a liveness probe fails, and ``failure_rate``, the chance that a
module configuration is broken (it crash-loops, or never becomes ready). Brokenness is drawn from
the seed, the device, the module and its configuration hash, so it is the same on every start and
in every run with the same seed, and rolling back to a configuration that worked works again.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Literal, overload

from agent.actions import Create, Pull, Remove, Restart, Start, Stop
from agent.health import (
    DEFAULT_START_PERIOD_S,
    HealthResult,
    LivenessCount,
    ProbeTarget,
    count_probe,
    probe_interval,
)
from agent.observed import ImageAvailability, ObservedModule, ObservedStatus, PullFailure
from agent.runtime import Observation, RuntimeActionError
from modules.contract import DesiredModule, HealthCheck, ModuleHealth
from modules.profiles import load_profiles

Range = tuple[float, float]
WAKE_MARGIN_S = 0.005
"""Wake the agent this long after a pull's end (the loop's timers may fire a little early)."""
Breakage = Literal["crash-loop", "never-ready"]


def _check_range(name: str, value: Range) -> None:
    low, high = value
    if not 0 <= low <= high:
        raise ValueError(f"{name}: expected 0 <= low <= high seconds, got {low:g}..{high:g}")


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name}: a probability is between 0 and 1, got {value:g}")


@dataclass(frozen=True)
class SimulationSettings:
    """The script simulated modules follow; ranges are ``(low, high)`` seconds, drawn uniformly."""

    pull_s: Range = (0.2, 1.5)
    """How long a pull takes."""
    start_s: Range = (0.0, 0.1)
    """How long the start action takes (the runner waits for it, as for ``docker start``)."""
    ready_s: Range = (0.3, 2.0)
    """From start until the model is loaded and the module answers ready."""
    crash_probability: float = 0.0
    """Chance that a start ends in a crash (exit 137) after ``crash_after_s``."""
    crash_after_s: Range = (2.0, 30.0)
    health_failure_probability: float = 0.0
    """Chance that one liveness probe of a running module fails."""
    pull_failure_probability: float = 0.0
    """Chance that one pull fails (the agent retries with back-off)."""
    failure_rate: float = 0.0
    """Chance that a module configuration is broken: it crash-loops or never becomes ready."""
    probe_latency_ms: Range = (0.5, 5.0)

    def __post_init__(self) -> None:
        for name in ("pull_s", "start_s", "ready_s", "crash_after_s", "probe_latency_ms"):
            _check_range(name, getattr(self, name))
        for name in (
            "crash_probability",
            "health_failure_probability",
            "pull_failure_probability",
            "failure_rate",
        ):
            _check_probability(name, getattr(self, name))


def execution_provider(profile: str) -> str:
    """What a module on ``profile`` reports as its execution provider (``openvino:MYRIAD``…)."""
    return _providers().get(profile, "CPUExecutionProvider")


_PROVIDERS: dict[str, str] = {}


def _providers() -> dict[str, str]:
    if not _PROVIDERS:
        for name, p in load_profiles().items():
            if p.onnxruntime is not None:
                _PROVIDERS[name] = p.onnxruntime.providers[0].name
            elif p.openvino is not None:
                _PROVIDERS[name] = f"openvino:{p.openvino.device}"
    return _PROVIDERS


@dataclass
class _Module:
    spec: DesiredModule
    config_hash: str
    broken: Breakage | None
    status: ObservedStatus = "created"
    started_at: float | None = None
    finished_at: float | None = None
    exit_code: int | None = None
    ready_at: float | None = None
    crash_at: float | None = None
    crash_code: int = 137


@dataclass
class _Image:
    done_at: float
    fails: bool
    attempts_failed: int = 0
    error: str | None = None
    failed_at: float | None = None


@dataclass
class _Pulls:
    """The part of ``PullTracker`` the agent looks at (``pulling``), computed from the clock.

    ``also_wake`` events are set when a simulated download finishes, so the agent need not poll.
    """

    runtime: SimulatedRuntime
    wakers: list[asyncio.Event] = field(default_factory=list)

    def also_wake(self, event: asyncio.Event) -> None:
        """Set ``event`` whenever a pull finishes."""
        self.wakers.append(event)

    def finish_at(self, done_at: float) -> None:
        """Set the wakers when the pull finishing at ``done_at`` (runtime clock) is done."""
        if not self.wakers:
            return
        loop = asyncio.get_running_loop()
        loop.call_later(max(done_at - self.runtime.clock(), 0.0) + WAKE_MARGIN_S, self._wake)

    def _wake(self) -> None:
        for event in self.wakers:
            event.set()

    @property
    def pulling(self) -> frozenset[str]:
        """Images whose simulated download has not finished yet."""
        now = self.runtime.clock()
        return frozenset(ref for ref, image in self.runtime.images.items() if image.done_at > now)


@dataclass
class SimulatedRuntime:
    """Modules of one simulated device, in memory; ``profile`` sets the execution provider reported."""

    device_id: str
    settings: SimulationSettings = field(default_factory=SimulationSettings)
    seed: int = 0
    profile: str = "cpu"
    clock: Callable[[], float] = time.time
    """Seconds since the epoch (the agent's own clock is UTC wall time too)."""
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    modules: dict[str, _Module] = field(default_factory=dict)
    images: dict[str, _Image] = field(default_factory=dict)
    present: set[str] = field(default_factory=set)
    failed_images: dict[str, _Image] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"{self.seed}:{self.device_id}")
        self.pulls = _Pulls(self)
        self.provider = execution_provider(self.profile)

    def _draw(self, window: Range) -> float:
        low, high = window
        return low if high <= low else self.rng.uniform(low, high)

    def breakage(self, module: str, config_hash: str) -> Breakage | None:
        """Whether this configuration of ``module`` is broken on this device, and how (always the same)."""
        if self.settings.failure_rate <= 0:
            return None
        fate = random.Random(f"{self.seed}:{self.device_id}:{module}:{config_hash}")
        if fate.random() >= self.settings.failure_rate:
            return None
        return "crash-loop" if fate.random() < 0.5 else "never-ready"

    # ---- observation -----------------------------------------------------------------------------

    def _settle(self, now: float) -> None:
        for ref, image in list(self.images.items()):
            if image.done_at > now:
                continue
            del self.images[ref]
            if image.fails:
                image.attempts_failed += 1
                image.error = f"pull {ref}: simulated registry error (503 Service Unavailable)"
                image.failed_at = image.done_at
                self.failed_images[ref] = image
            else:
                self.present.add(ref)
                self.failed_images.pop(ref, None)
        for module in self.modules.values():
            if module.status == "running" and module.crash_at is not None and module.crash_at <= now:
                module.status = "exited"
                module.exit_code = module.crash_code
                module.finished_at = module.crash_at
                module.crash_at = None

    async def observe(self, images: Collection[str] = ()) -> Observation:
        """The simulated modules now, and which images are present, pulling or failed."""
        now = self.clock()
        self._settle(now)
        out = {
            name: ObservedModule(
                name=name,
                image=m.spec.image,
                status=m.status,
                config_hash=m.config_hash,
                image_id=f"sim:{m.spec.image}",
                exit_code=m.exit_code if m.status == "exited" else None,
                started_at=_utc(m.started_at),
                finished_at=_utc(m.finished_at) if m.status == "exited" else None,
            )
            for name, m in self.modules.items()
        }
        failed = {
            ref: PullFailure(
                error=i.error or "pull failed", failed_at=_utc(i.failed_at or now), attempts=i.attempts_failed
            )
            for ref, i in self.failed_images.items()
            if ref not in self.present
        }
        availability = ImageAvailability(
            present=frozenset(self.present), pulling=frozenset(self.images), failed=failed
        )
        return out, availability

    def health(self, module: str, now: float) -> tuple[bool, bool, str | None]:
        """``(live, ready, error)`` of a running module at ``now`` (probe failures not included)."""
        m = self.modules.get(module)
        if m is None or m.status != "running" or m.started_at is None:
            return False, False, f"module {module} is not running"
        if m.broken == "never-ready":
            return True, False, "model failed to load (simulated)"
        if m.broken == "crash-loop" or (m.ready_at is not None and now < m.ready_at):
            return True, False, "loading model"
        return True, True, None

    def health_url(self, module: str, check: HealthCheck) -> str | None:
        """A ``sim://`` address while the module runs (the simulated prober reads the runtime instead)."""
        m = self.modules.get(module)
        if m is None or m.status != "running":
            return None
        return f"sim://{self.device_id}/{module}:{check.port}"

    # ---- actions ---------------------------------------------------------------------------------

    async def pull(self, action: Pull) -> None:
        """Start a simulated download unless the image is here or on its way."""
        if action.image in self.present or action.image in self.images:
            return
        previous = self.failed_images.get(action.image)
        done_at = self.clock() + self._draw(self.settings.pull_s)
        fails = self.rng.random() < self.settings.pull_failure_probability
        image = _Image(done_at=done_at, fails=fails)
        if previous is not None:
            image.attempts_failed = previous.attempts_failed
        self.images[action.image] = image
        self.pulls.finish_at(done_at)

    async def create(self, action: Create) -> None:
        """Create the module (not started) from an image that is present."""
        self._settle(self.clock())
        if action.module in self.modules:
            raise RuntimeActionError(action.module, "already exists; remove it first")
        if action.spec.image not in self.present:
            raise RuntimeActionError(action.module, f"image {action.spec.image} is not present")
        self.modules[action.module] = _Module(
            spec=action.spec,
            config_hash=action.config_hash,
            broken=self.breakage(action.module, action.config_hash),
        )

    async def start(self, action: Start) -> None:
        """Start a created or exited module; its ready and crash times are drawn now."""
        m = self._get(action.module)
        if m.status == "running":
            return
        delay = self._draw(self.settings.start_s)
        if delay > 0:
            await self.sleep(delay)
        now = self.clock()
        m.status, m.started_at, m.exit_code, m.finished_at = "running", now, None, None
        m.ready_at = now + self._draw(self.settings.ready_s)
        m.crash_at, m.crash_code = None, 137
        if m.broken == "crash-loop":
            m.crash_at, m.crash_code = now + self._draw((0.2, 1.0)), 1
        elif self.rng.random() < self.settings.crash_probability:
            m.crash_at = now + self._draw(self.settings.crash_after_s)

    async def stop(self, action: Stop) -> None:
        """Stop a running module (exit 143, as after SIGTERM)."""
        m = self._get(action.module)
        self._settle(self.clock())
        if m.status == "running":
            m.status, m.exit_code, m.finished_at, m.crash_at = "exited", 143, self.clock(), None

    async def remove(self, action: Remove) -> None:
        """Forget the module."""
        self.modules.pop(action.module, None)

    async def restart(self, action: Restart) -> None:
        """Stop the module if it runs, then start it again."""
        m = self._get(action.module)
        m.status = "exited"
        await self.start(Start(module=action.module, reason=action.reason))

    async def logs(self, module: str, tail: int = 100) -> str:
        """A few synthetic lines describing the module's simulated life."""
        m = self._get(module)
        lines = [
            f"simulated module {module} ({m.spec.image}) on {self.device_id}, provider {self.provider}",
            f"status {m.status}" + (f", exit code {m.exit_code}" if m.exit_code is not None else ""),
        ]
        if m.broken:
            lines.append(f"this configuration is broken on this device ({m.broken})")
        return "\n".join(lines[-tail:])

    async def collect_images(self, keep: Collection[str], now: datetime) -> list[str]:
        """Simulated images take no disk: nothing to collect."""
        return []

    async def close(self) -> None:
        """Nothing to release."""

    def _get(self, module: str) -> _Module:
        m = self.modules.get(module)
        if m is None:
            raise RuntimeActionError(module, "does not exist")
        return m


class SimulatedProber:
    """Answers the agent's health probes from a ``SimulatedRuntime``, on each module's interval.

    Failed liveness probes count as ``HealthProber`` counts them (``count_probe``): not during the
    start period (``start_period_s`` after a start, until the module was live once).
    """

    def __init__(self, runtime: SimulatedRuntime, start_period_s: float = DEFAULT_START_PERIOD_S) -> None:
        if not start_period_s >= 0:
            raise ValueError(f"start_period_s must not be negative, got {start_period_s}")
        self.runtime = runtime
        self.start_period_s = start_period_s
        self._tracks: dict[str, _Track] = {}

    async def check(self, targets: Iterable[ProbeTarget]) -> dict[str, HealthResult]:
        """Probe the targets that are due; the latest result of every target probed at least once."""
        rt = self.runtime
        now = rt.clock()
        tracks = self._tracks
        targets = list(targets)
        names = {t.module for t in targets}
        for gone in [name for name in tracks if name not in names]:
            del tracks[gone]
        for target in targets:
            name = target.module
            started = target.started_at.timestamp() if target.started_at else None
            track = tracks.get(name)
            if track is not None and track.started == started:
                if now - track.probed_at < probe_interval(target.check, track.ready_seen):
                    continue
            else:
                track = None
            live, ready, error = rt.health(name, now)
            if live and rt.rng.random() < rt.settings.health_failure_probability:
                live, ready, error = False, False, f"liveness GET {target.base_url}/: simulated timeout"
            previous = track.result if track is not None else None
            since_start = now - started if started is not None else 0.0
            count = count_probe(
                track.count if track is not None else LivenessCount(), live, since_start, self.start_period_s
            )
            if count.starting and error is not None:
                error += f" (starting: not counted until live or {self.start_period_s:g} s after the start)"
            health = ModuleHealth(
                live=live,
                ready=ready,
                latency_ms=round(rt._draw(rt.settings.probe_latency_ms), 3) if live else None,
                checked_at=_utc(now),
                error=error,
            )
            provider = rt.provider if ready else (previous.execution_provider if previous else None)
            result = HealthResult(health, count.failures, provider, count.starting)
            ready_seen = ready or (track is not None and track.ready_seen)
            tracks[name] = _Track(started, now, result, count, ready_seen)
        return {name: track.result for name, track in tracks.items()}


@dataclass
class _Track:
    started: float | None
    probed_at: float
    result: HealthResult
    count: LivenessCount
    ready_seen: bool = False


@overload
def _utc(ts: float) -> datetime: ...
@overload
def _utc(ts: float | None) -> datetime | None: ...
def _utc(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc)
