"""The reconcile loop: ``Agent.reconcile_once`` is the only place that decides what happens next.

Each pass, level-based (nothing is carried over from the event that woke it):

1. take the newest desired-state payload, if one came, and ``admit`` it: a rejection is reported
   (``deployment_status: rejected``, its reason, ``generation_received``) and changes nothing; the
   retained re-delivery of the applied generation is ignored; an admitted state is saved as the
   last applied (durably, before anything is done about it);
2. observe the runtime and probe the health of the modules that run;
3. ``plan`` from the active desired state, the observation and the restart books;
4. hand the plan to the ``PlanRunner`` (pulls only start, in the background);
5. while a new generation is applying, ``evaluate_rollout``: healthy → last known good; failed →
   ``decide_rollback`` (roll back to the last known good state, or stay ``failed``);
6. build the ``ReportedState`` and publish it when it changed (``agent.reporting``); a small
   ``Heartbeat`` every ``heartbeat_s`` otherwise.

``run`` loads the durable state first and starts reconciling ``state.active`` at once, without
waiting for the broker. Between passes it sleeps until a desired state or command arrives, the
plan's earliest ``wait``, a runner retry, a health probe, a pull poll, the rollout deadline or the
heartbeat is due; with nothing to do it backs off up to ``IDLE_MAX_S``. A pass that raises (Docker
Engine gone, a disk error) is logged and retried with back-off: the loop never ends on bad input.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.metadata
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from agent.actions import Plan, SetRestartBook
from agent.admission import Rejected, admit
from agent.commands import CommandHandler
from agent.config import AgentConfig
from agent.fallback import Choice, choose, effective
from agent.health import HealthProber, HealthResult, ProbeTarget, probe_interval
from agent.link import DesiredSlot
from agent.metrics import AgentMetrics
from agent.observed import ImageAvailability, ObservedModule
from agent.planner import module_status, plan
from agent.reporting import Reporter, Sent
from agent.restart import RestartBook, record_restart
from agent.rollback import Failed, Healthy, Pending, RollBack, decide_rollback, evaluate_rollout
from agent.runner import PlanRunner, RunResult
from agent.runtime import ModuleRuntime, executors
from agent.state import AgentState, StateStore
from agent.sysmetrics import SystemSampler
from modules.contract import (
    Accelerator,
    ClientConflict,
    CommandRequest,
    CommandResponse,
    DeploymentStatus,
    DesiredState,
    Heartbeat,
    ModuleStatus,
    Rejection,
    ReportedState,
    utcnow,
)

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
SETTLE_S = 0.2
"""After a pass that changed something, look again this soon."""
PULL_POLL_S = 1.0
IDLE_BASE_S = 1.0
IDLE_MAX_S = 30.0
MIN_WAKE_S = 0.05
ERROR_BACKOFF_MAX_S = 60.0
GC_EVERY_S = 60.0


@functools.cache
def agent_version() -> str:
    """The installed ``edgedeploy`` version (``dev`` when running from a source tree)."""
    try:
        return importlib.metadata.version("edgedeploy")
    except importlib.metadata.PackageNotFoundError:
        return "dev"


class AgentLink(Protocol):
    """What the loop needs from the MQTT link (``agent.link.Link``, or a stand-in in unit tests)."""

    desired: DesiredSlot
    client_conflict: ClientConflict | None
    """Set once another MQTT client took this device's session over."""

    @property
    def connected(self) -> bool:
        """Whether the session is up."""
        ...

    @property
    def sessions(self) -> int:
        """How many sessions came up so far."""
        ...

    def also_wake_on_connect(self, event: asyncio.Event) -> None:
        """Set ``event`` whenever a session comes up."""
        ...

    def commands(self) -> AsyncIterator[CommandRequest]:
        """Incoming command requests."""
        ...

    async def publish_reported(self, state: ReportedState) -> None:
        """Queue a report (the newest unsent one wins)."""
        ...

    async def publish_heartbeat(self, heartbeat: Heartbeat) -> None:
        """Send a heartbeat if the session is up and no report waits (it is dropped otherwise)."""
        ...

    def announce(self, generation: int) -> None:
        """Tell the broker, at every session start, which generation this device has."""
        ...

    async def respond(self, response: CommandResponse) -> None:
        """Answer a command."""
        ...


class Prober(Protocol):
    """Probes running modules (``agent.health.HealthProber``)."""

    async def check(self, targets: Iterable[ProbeTarget]) -> dict[str, HealthResult]:
        """The latest result of every target probed at least once."""
        ...


@dataclass(frozen=True)
class PassResult:
    """What one pass saw and did, and how soon the next one should run."""

    plan: Plan
    run: RunResult
    report: ReportedState
    published: Sent
    """What went out: the full report, a heartbeat, or nothing."""
    wake_in_s: float


class Agent:
    """One device's agent: durable state, runtime, prober and link, driven by ``run``."""

    def __init__(
        self,
        config: AgentConfig,
        runtime: ModuleRuntime,
        link: AgentLink | None,
        *,
        public_key: Ed25519PublicKey,
        prober: Prober | None = None,
        store: StateStore | None = None,
        metrics: AgentMetrics | None = None,
        accelerators: Sequence[Accelerator] | None = None,
        present_profiles: Collection[str] | None = None,
        sampler: SystemSampler | None = None,
        clock: Callable[[], datetime] = utcnow,
        expiry_leeway_s: float = 30.0,
        local_report: bool = True,
    ) -> None:
        """``accelerators``: detected at start-up from the device profiles when not given, with
        ``present_profiles`` (the profiles whose hardware is here; given accelerators and no
        profiles, every profile counts as present and only a failed start falls back);
        ``clock``: aware UTC time (tests inject one); ``expiry_leeway_s``: clock skew tolerated
        when checking ``expires_at``; ``local_report``: keep the last report in ``reported.json``
        for ``edge-agent status`` (a simulator, which has no such command, turns it off)."""
        self.config = config
        self.runtime = runtime
        self.link = link
        self.public_key = public_key
        self.prober: Prober = prober or HealthProber(start_period_s=config.health_start_period_s)
        self.store = store or StateStore(Path(config.state_dir) / STATE_FILE)
        self.metrics = metrics or AgentMetrics()
        self.metrics.connected = lambda: bool(link is not None and link.connected)
        self.accelerators: list[Accelerator] | None = list(accelerators) if accelerators is not None else None
        self.present_profiles: Collection[str] | None = present_profiles
        self.strict_profiles: frozenset[str] = frozenset()
        self._choices: dict[str, Choice] = {}
        """Which of each module's profile images runs (``agent/fallback.py``)."""
        self.reporter = Reporter(
            config,
            link,
            sampler or SystemSampler(Path(config.state_dir), min_free_mb=config.pull.min_free_mb),
            self.metrics,
            local_copy=local_report,
        )
        self.clock = clock
        self.expiry_leeway_s = expiry_leeway_s
        self.version = agent_version()
        self.planner_config = config.planner_config()
        table: dict[Any, Any] = dict(executors(runtime))
        table["set_restart_book"] = self._set_book
        self.runner = PlanRunner(table, counter=self.metrics)
        self.commands = CommandHandler(
            runtime, self.runner, lambda: self.state.active, self._ping_status, after_restart=self._restarted
        )
        self.state = AgentState()
        self._loaded = False
        self._dirty = False
        self._last_rejection: Rejection | None = None
        """The last payload refused: an event, reported as ``last_rejection`` until a newer one."""
        self._refused_newer = False
        """The last payload received was refused and newer than what runs: the status says rejected."""
        self._pending: Pending | None = None
        self._idle_passes = 0
        self._gc_at: datetime | None = None
        self._kick = asyncio.Event()
        self._stop = asyncio.Event()
        self._started = time.monotonic()

    # ---- lifecycle -----------------------------------------------------------------------------

    async def load(self) -> AgentState:
        """Load the durable state (once) and the accelerators; the first pass restores ``state.active``."""
        if not self._loaded:
            self.state = await asyncio.to_thread(self.store.load)
            self._loaded = True
            active = self.state.active
            if active is not None:
                log.info(
                    "restoring generation %d (%s, %d modules) from %s",
                    active.generation,
                    self.state.status,
                    len(active.modules),
                    self.store.path,
                )
            else:
                log.info("no desired state stored in %s yet: waiting for one", self.store.path)
            if self.link is not None:
                self.link.announce(self.state.last_generation)
        if self.accelerators is None:
            found = await asyncio.to_thread(_detect)
            self.accelerators = found.accelerators
            if self.present_profiles is None:
                self.present_profiles = found.profiles
            self.strict_profiles = found.strict
        return self.state

    def wake(self) -> None:
        """Run the next pass now (a command changed something)."""
        self._kick.set()

    def _restarted(self, module: str) -> None:
        """An operator restarted ``module``: it counts in its restart count, and the loop looks again."""
        book = self.state.restart_books.get(module, RestartBook())
        self.state = self.state.with_book(module, record_restart(book, self.clock()))
        self._dirty = True
        self.wake()

    def stop(self) -> None:
        """Make ``run`` return after the current pass; modules keep running."""
        self._stop.set()
        self._kick.set()

    async def run(self) -> None:
        """Reconcile until ``stop`` (or cancellation); never returns because of a failed pass."""
        await self.load()
        if self.link is not None:
            self.link.desired.also_wake(self._kick)
            self.link.also_wake_on_connect(self._kick)  # a fresh report in every new session
        also_wake = getattr(getattr(self.runtime, "pulls", None), "also_wake", None)
        if also_wake is not None:  # a tracker that says when a pull ends: no need to wait for the poll
            also_wake(self._kick)
        command_task = (
            asyncio.create_task(self._serve_commands(), name="agent-commands") if self.link else None
        )
        errors = 0
        try:
            while not self._stop.is_set():
                try:
                    result = await self.reconcile_once()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    errors += 1
                    delay = min(IDLE_BASE_S * 2 ** min(errors - 1, 16), ERROR_BACKOFF_MAX_S)
                    log.exception("reconcile pass failed (%d in a row); next try in %.0f s", errors, delay)
                    await self._report_failed_pass(exc, errors)
                else:
                    errors = 0
                    delay = result.wake_in_s
                await self._sleep(delay)
        finally:
            if command_task is not None:
                command_task.cancel()
                await asyncio.gather(command_task, return_exceptions=True)
            close = getattr(self.prober, "close", None)
            if close is not None:
                await close()

    async def _sleep(self, seconds: float) -> None:
        """Wait ``seconds`` or until woken (a desired state, a command, ``stop``): one event, no tasks."""
        timer = asyncio.get_running_loop().call_later(max(seconds, MIN_WAKE_S), self._kick.set)
        try:
            await self._kick.wait()
        finally:
            timer.cancel()
        self._kick.clear()

    # ---- one pass ------------------------------------------------------------------------------

    async def reconcile_once(self) -> PassResult:
        """One pass: admit, observe, plan, run, evaluate the rollout, report (see the module doc)."""
        await self.load()
        now = self.clock()
        self.metrics.passes += 1
        await self._take_desired(now)
        raw = self.state.active
        desired = self._choose(raw, {}, {})
        images = sorted({m.image for m in desired.modules.values()}) if desired else []
        observed, availability = await self.runtime.observe(images)
        errors = {name: str(e) for name, e in self.runner.module_errors().items()}
        chosen = self._choose(raw, observed, errors)
        if chosen is not None and chosen != desired:
            self.runner.reset()  # the failures were the previous image's
            missing = sorted({m.image for m in chosen.modules.values()} - set(images))
            if missing:
                observed, availability = await self.runtime.observe(sorted({*images, *missing}))
        desired = chosen
        health = await self._probe(desired, observed)
        observed = {
            name: replace(o, health=health[name].health, health_failures=health[name].failures)
            if name in health
            else o
            for name, o in observed.items()
        }
        planned = plan(desired, observed, availability, self.state.restart_books, now, self.planner_config)
        ran = await self.runner.run(planned, now)
        self._evaluate(now, observed, availability)
        await self._collect_images(now)
        if self._dirty:
            await self._save()
        if self.state.active is not raw:
            return await self.reconcile_once()  # rolled back: plan and report the known good state now
        report = self._report(desired, observed, availability, planned, health, now)
        published = await self._publish(report, now)
        return PassResult(planned, ran, report, published, self._next_wake(planned, ran, observed, now))

    async def _collect_images(self, now: datetime) -> None:
        """Every ``GC_EVERY_S``: let the runtime remove the images it pulled that neither the last
        applied nor the last known good state names (``agent/runtime/image_gc.py``)."""
        if self._gc_at is not None and (now - self._gc_at).total_seconds() < GC_EVERY_S:
            return
        self._gc_at = now
        states = (self.state.last_applied, self.state.last_known_good)
        keep = {c.image for s in states if s for m in s.modules.values() for c in m.candidates()}
        try:
            await self.runtime.collect_images(keep, now)
        except Exception:
            log.exception("image garbage collection failed (tried again in %.0f s)", GC_EVERY_S)

    async def _take_desired(self, now: datetime) -> None:
        raw = self.link.desired.take() if self.link is not None else None
        if raw is None:
            return
        try:
            desired = admit(
                raw,
                device_id=self.config.device_id,
                last_generation=self.state.last_generation,
                public_key=self.public_key,
                now=now,
                leeway_s=self.expiry_leeway_s,
            )
        except Rejected as rejection:
            if self._is_redelivery(rejection, raw):
                log.debug("generation %s received again (retained): ignored", rejection.generation)
                self._refused_newer = False  # what the cloud wants is what runs
                return
            log.warning("desired state rejected (%s): %s", rejection.code, rejection.reason)
            self.metrics.rejections[rejection.code] += 1
            self._last_rejection = Rejection(
                code=rejection.code, reason=rejection.reason, generation=rejection.generation, at=now
            )
            applied = self.state.last_generation
            self._refused_newer = self.state.last_applied is None or (
                rejection.generation is not None and rejection.generation > (applied or 0)
            )
            return
        self._refused_newer = False
        self._pending = None
        self.state = self.state.applied(desired, now)
        self.runner.reset()
        await self._save()
        log.info(
            "applying generation %d (%d modules, rollback %s, health deadline %g s)",
            desired.generation,
            len(desired.modules),
            desired.rollback,
            desired.health_deadline_s,
        )

    def _choose(
        self, raw: DesiredState | None, observed: Mapping[str, ObservedModule], errors: Mapping[str, str]
    ) -> DesiredState | None:
        """``raw`` with each module's image as its profile fallback chooses now (logs what it takes)."""
        present = self.present_profiles
        everywhere = {c.profile for m in (raw.modules.values() if raw else ()) for c in m.candidates()}
        self._choices, lines = choose(
            raw,
            self._choices,
            observed,
            errors,
            everywhere if present is None else present,
            self.strict_profiles,
        )
        for line in lines:
            log.warning("%s", line)
        return effective(raw, self._choices)

    def _is_redelivery(self, rejection: Rejected, raw: bytes) -> bool:
        """The applied state arriving again (same generation and content): nothing to report."""
        if not rejection.is_redelivery(self.state.last_generation):
            return False
        try:
            return DesiredState.model_validate_json(raw) == self.state.last_applied
        except ValueError:
            return False

    async def _probe(
        self, desired: DesiredState | None, observed: Mapping[str, ObservedModule]
    ) -> dict[str, HealthResult]:
        targets = []
        for name, module in (desired.modules if desired else {}).items():
            o = observed.get(name)
            if o is None or o.status != "running":
                continue
            url = self.runtime.health_url(name, module.health)
            if url is not None:
                targets.append(ProbeTarget(name, url, module.health, o.started_at, o.instance))
        return await self.prober.check(targets)

    async def _set_book(self, action: SetRestartBook) -> None:
        self.state = self.state.with_book(action.module, action.book)
        self._dirty = True

    async def _save(self) -> None:
        if getattr(self.store, "inline", False):  # a store in memory (simulated devices): no thread hop
            self.store.save(self.state)
        else:
            await asyncio.to_thread(self.store.save, self.state)
        self._dirty = False

    def _evaluate(
        self, now: datetime, observed: Mapping[str, ObservedModule], images: ImageAvailability
    ) -> None:
        state = self.state
        if state.status != "applying" or state.last_applied is None or state.applied_at is None:
            self._pending = None
            return
        verdict = evaluate_rollout(
            effective(state.last_applied, self._choices) or state.last_applied,
            state.applied_at,
            observed,
            now,
            images,
        )
        if isinstance(verdict, Pending):
            self._pending = verdict
            return
        self._pending = None
        generation = state.last_applied.generation
        if isinstance(verdict, Healthy):
            log.info("generation %d is healthy: it is the last known good one now", generation)
            self.state = state.became_healthy()
        elif isinstance(verdict, Failed):
            decision = decide_rollback(verdict, state.last_applied, state.last_known_good)
            if isinstance(decision, RollBack):
                log.warning("rolling back: %s", decision.reason)
                self.state = state.rolled_back(decision.reason)
                self.metrics.rollbacks += 1
                self.runner.reset()
                self.wake()
            else:
                log.error("generation %d failed: %s", generation, decision.reason)
                self.state = state.failed(decision.reason)
        self._dirty = True

    # ---- reporting -----------------------------------------------------------------------------

    async def _report_failed_pass(self, exc: Exception, in_a_row: int) -> None:
        """Tell the cloud that this device cannot reconcile (e.g. Docker Engine is down) and why.

        Without this the last report, perhaps "healthy", would stand while nothing is observed.
        A desired state rejected in the failed pass is still reported as rejected.
        """
        now = self.clock()
        reason = f"reconcile pass failed ({in_a_row} in a row): {type(exc).__name__}: {exc}"
        desired = self.state.active
        modules = {
            name: ModuleStatus(runtime_status="failed", image=m.image, message=f"not observed: {reason}")
            for name, m in (desired.modules if desired else {}).items()
        }
        rejected = self._last_rejection if self._refused_newer else None
        report = ReportedState(
            device_id=self.config.device_id,
            generation_applied=desired.generation if desired else 0,
            generation_received=rejected.generation if rejected else None,
            deployment_status="rejected" if rejected else "failed",
            reason=f"{rejected.reason}; {reason}" if rejected else reason,
            modules=modules,
            accelerators=self.accelerators or [],
            agent_version=self.version,
            reported_at=now,
        )
        try:
            await self._publish(report, now)
        except Exception:
            log.exception("could not report the failed pass either")

    def _report(
        self,
        desired: DesiredState | None,
        observed: Mapping[str, ObservedModule],
        images: ImageAvailability,
        planned: Plan,
        health: Mapping[str, HealthResult],
        now: datetime,
    ) -> ReportedState:
        errors = self.runner.module_errors()
        modules: dict[str, ModuleStatus] = {}
        for name, m in (desired.modules if desired else {}).items():
            book = self.state.restart_books.get(name, RestartBook())
            status = module_status(name, m, observed.get(name), images, book, planned)
            update: dict[str, Any] = {}
            result = health.get(name)
            if result is not None and result.execution_provider and status.runtime_status == "running":
                update["execution_provider"] = result.execution_provider
            choice = self._choices.get(name)
            update["profile"] = m.profile
            if choice is not None and choice.note:
                update["profile_note"] = choice.note
            error = errors.get(name)
            if error is not None:
                update["message"] = str(error)
                if status.runtime_status in ("stopped", "created") and m.desired_status == "running":
                    update["runtime_status"] = "failed"
            modules[name] = status.model_copy(update=update) if update else status
        self.metrics.set_modules(s.runtime_status for s in modules.values())
        self.metrics.generation_applied = desired.generation if desired else 0
        if self.link is not None:
            self.link.announce(self.state.last_generation)
        state = self.state
        received = state.last_applied.generation if state.last_applied else None
        reason: str | None
        status_: DeploymentStatus
        if self._refused_newer and self._last_rejection is not None:
            status_, reason = "rejected", self._last_rejection.reason
            received = self._last_rejection.generation
        elif state.status is None:
            status_, reason = "healthy", "no desired state received yet"
        elif state.status == "applying" and self._pending is not None:
            status_, reason = "applying", "waiting for " + "; ".join(self._pending.waiting_for)
        else:
            status_, reason = state.status, state.reason
        return ReportedState(
            device_id=self.config.device_id,
            generation_applied=desired.generation if desired else 0,
            generation_received=received,
            deployment_status=status_,
            reason=reason,
            modules=modules,
            accelerators=self.accelerators or [],
            agent_version=self.version,
            reported_at=now,
        )

    async def _publish(self, report: ReportedState, now: datetime) -> Sent:
        return await self.reporter.publish(report, now, self._last_rejection)

    def _next_wake(
        self, planned: Plan, ran: RunResult, observed: Mapping[str, ObservedModule], now: datetime
    ) -> float:
        if ran.changed_anything:
            self._idle_passes = 0
            return SETTLE_S
        self._idle_passes += 1
        candidates = [min(IDLE_BASE_S * 2 ** min(self._idle_passes, 16), IDLE_MAX_S)]
        if self.reporter.last_published is not None:
            heartbeat_at = self.reporter.last_published.timestamp() + self.config.heartbeat_s
            candidates.append(heartbeat_at - now.timestamp())
        for at in (planned.wake_at, ran.wake_at, self._pending.deadline if self._pending else None):
            if at is not None:
                candidates.append((at - now).total_seconds())
        desired = self.state.active
        if desired is not None:
            intervals = [
                probe_interval(m.health, ready_seen=bool(o.health and o.health.ready))
                for name, m in desired.modules.items()
                if (o := observed.get(name)) is not None and o.status == "running"
            ]
            if intervals:
                candidates.append(min(intervals))
        if any(a.kind == "pull" for a in planned) or self._pulls_in_flight(desired):
            candidates.append(PULL_POLL_S)
        return max(min(candidates), MIN_WAKE_S)

    def _pulls_in_flight(self, desired: DesiredState | None) -> bool:
        pulls = getattr(self.runtime, "pulls", None)
        return bool(desired is not None and pulls is not None and pulls.pulling)

    def _ping_status(self) -> dict[str, object]:
        active = self.state.active
        return {
            "device_id": self.config.device_id,
            "agent_version": self.version,
            "generation_applied": active.generation if active else 0,
            "deployment_status": self.state.status,
            "uptime_s": round(time.monotonic() - self._started, 1),
        }

    # ---- commands ------------------------------------------------------------------------------

    async def _serve_commands(self) -> None:
        assert self.link is not None
        async for request in self.link.commands():
            response = await self.commands.handle(request)
            try:
                await self.link.respond(response)
            except Exception as exc:
                log.warning("cannot answer command %s: %s", request.id, exc)


@dataclass(frozen=True)
class _Found:
    accelerators: list[Accelerator]
    profiles: list[str] | None
    strict: frozenset[str]


def _detect() -> _Found:
    """The accelerators and present profiles (detection rules), and which profiles are strict."""
    from agent.detect import detect
    from modules.profiles import load_profiles

    try:
        profiles = load_profiles()
    except Exception as exc:
        log.warning("device profiles could not be read, so no accelerator detection or fallback: %s", exc)
        return _Found([], None, frozenset())
    strict = frozenset(p.name for p in profiles.values() if p.strict)
    try:
        found = detect(profiles.values())
    except Exception as exc:
        log.warning("accelerator detection failed: %s", exc)
        return _Found([], None, strict)
    log.info("profiles present on this device: %s", ", ".join(found.profiles) or "none")
    return _Found(found.accelerators, found.profiles, strict)
