"""Many agents in one process, for fleet tests and benchmarks (``edgectl simulate``).

Every simulated device is a real agent: its own ``Link`` (its own MQTT connection, client id and
credentials), the real admission, planner, runner, rollout/rollback and ``StateStore`` (one state
folder per device, on tmpfs by default), driven by ``Agent.run``, the same reconcile loop as
``edge-agent run``. Only the module runtime is simulated (``agent.runtime.simulated``), with the
health prober and the system metrics that go with it. Simulated devices and real agents can share
a broker: a simulated device is just another MQTT client with a device id.

``SimulatedFleet.run`` starts the devices at ``connect_rate`` per second (the broker sees a ramp, not a
stampede), reports progress every ``progress_s`` and, after ``duration_s`` (or ``stop``), stops
every agent and disconnects cleanly. ``SimulatedFleet.snapshot`` counts devices by connection and by the
deployment status of their last report at any time.

One process holds thousands of devices because nothing here takes a thread: the MQTT clients run
on the event loop (``edgemqtt.session``) and simulated modules change state only when observed.
``run_in_processes`` splits a fleet over a few worker processes (one event loop per CPU core) and
adds up their counts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import gc
import logging
import multiprocessing
import os
import queue
import random
import resource
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import SecretStr

from agent.agent import STATE_FILE, Agent
from agent.config import AgentConfig, BrokerConfig
from agent.link import Link
from agent.metrics import AgentMetrics
from agent.runtime.simulated import SimulatedProber, SimulatedRuntime, SimulationSettings
from agent.state import AgentState, StateStore
from agent.sysmetrics import SystemSampler
from edgemqtt.endpoint import split_urls
from modules.contract import Accelerator, DeviceProfile, ReportedState, SystemMetrics
from modules.profiles import load_profiles

log = logging.getLogger(__name__)

DEVICE_PREFIX = "sim-"
SHUTDOWN_BATCH = 500
GC_THRESHOLDS = (10_000, 20, 100)
"""Collector thresholds with ``tune_gc`` (the default is 700, 10, 10)."""
GC_FREEZE_EVERY = 500
GC_FREEZE_AFTER_S = 5.0
"""With ``tune_gc``: freeze after every ``GC_FREEZE_EVERY`` devices started, and this long after the last."""
STATUSES = ("healthy", "applying", "failed", "rolled_back", "rejected", "waiting", "none")
"""Deployment statuses of last reports; ``waiting``: no desired state yet; ``none``: no report yet."""


@dataclass(frozen=True)
class SimDevice:
    """One simulated device: id, device profile and MQTT credentials (``None``: anonymous)."""

    device_id: str
    profile: str = "cpu"
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    index: int | None = None
    """Its place in the whole fleet: device i connects to node i mod n of a cluster first. None: its
    place in the ``SimulatedFleet`` that runs it (``run_in_processes`` sets it before splitting)."""


def device_ids(count: int, prefix: str = DEVICE_PREFIX) -> list[str]:
    """``sim-00001`` … (at least five digits, more when ``count`` needs them)."""
    width = max(5, len(str(count)))
    return [f"{prefix}{i:0{width}d}" for i in range(1, count + 1)]


def parse_profile_mix(text: str) -> dict[str, float]:
    """``"cpu=80,cuda=15,openvino-myriad=5"`` as weights; ValueError naming the bad part."""
    known = _profiles()
    mix: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        name, sep, weight = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"profile mix {part!r}: expected PROFILE=WEIGHT (e.g. cpu=80,cuda=20)")
        if name not in known:
            raise ValueError(
                f"profile mix {part!r}: no device profile {name!r} (known: {', '.join(sorted(known))})"
            )
        if name in mix:
            raise ValueError(f"profile mix: {name!r} given twice")
        try:
            value = float(weight)
        except ValueError:
            raise ValueError(f"profile mix {part!r}: weight {weight!r} is not a number") from None
        if not value >= 0:
            raise ValueError(f"profile mix {part!r}: a weight cannot be negative")
        mix[name] = value
    if not mix or sum(mix.values()) <= 0:
        raise ValueError(f"profile mix {text!r}: give at least one profile with a positive weight")
    return mix


def assign_profiles(count: int, mix: dict[str, float], seed: int = 0) -> list[str]:
    """``count`` profiles in the proportions of ``mix`` (largest remainder), shuffled by ``seed``."""
    total = sum(mix.values())
    exact = {name: count * w / total for name, w in mix.items()}
    counts = {name: int(x) for name, x in exact.items()}
    by_remainder = sorted(mix, key=lambda n: (exact[n] - counts[n], mix[n]), reverse=True)
    for name in by_remainder[: count - sum(counts.values())]:
        counts[name] += 1
    profiles = [name for name, n in counts.items() for _ in range(n)]
    random.Random(seed).shuffle(profiles)
    return profiles


@functools.cache
def _profiles() -> dict[str, DeviceProfile]:
    return load_profiles()


@functools.cache
def simulated_accelerators(profile: str) -> tuple[Accelerator, ...]:
    """The accelerators a device of ``profile`` would detect (one of each kind its rules name)."""
    detect = _profiles()[profile].detect
    kinds = dict.fromkeys(rule.accelerator for rule in [*detect.all_of, *detect.any_of])
    return tuple(Accelerator(kind=kind, path=f"/dev/sim-{kind}0", detail="simulated") for kind in kinds)


def raise_open_files_limit(wanted: int) -> int:
    """Raise the soft limit of open files towards ``wanted`` (up to the hard limit); the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


class SimulatedSampler(SystemSampler):
    """System metrics drawn around a per-device baseline instead of read from ``/proc``."""

    def __init__(self, state_dir: Path, rng: random.Random) -> None:
        super().__init__(state_dir)
        self._rng = rng
        self._base_cpu = rng.uniform(5, 40)
        self._total = rng.choice((2048.0, 4096.0, 8192.0))

    def sample(self) -> SystemMetrics:
        """Plausible numbers; no file is read."""
        r = self._rng
        return SystemMetrics(
            cpu_percent=round(min(100.0, max(0.0, self._base_cpu + r.uniform(-5, 5))), 1),
            memory_used_mb=round(self._total * r.uniform(0.3, 0.5), 1),
            memory_total_mb=self._total,
            disk_free_mb=round(r.uniform(2000, 20000), 1),
            temperature_c=round(r.uniform(40, 65), 1),
        )


class InlineExecutor(concurrent.futures.Executor):
    """An executor that runs each call at once in the caller's thread (see ``inline_file_io``)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        """Run ``fn(*args, **kwargs)`` now; a future that is already done."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


class TmpfsStateStore(StateStore):
    """A ``StateStore`` for a state folder on tmpfs: the same files, without the durability work.

    ``save`` writes a fixed temporary name and renames it over the file (still atomic for readers),
    with no random temporary name, no fsync and no ``.prev`` backup: on tmpfs a crash loses the
    folder anyway, and for thousands of devices those system calls cost more than the write.
    """

    inline = True
    """A save is a memory copy: the agent calls ``save`` on the event loop, not on a thread."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self._target = str(self.path)
        self._tmp = str(self.path.with_name(f"{self._temp_prefix}save.tmp"))
        self._made = False

    def save(self, state: AgentState) -> None:
        """Write ``state`` to a temporary file and rename it over ``path``."""
        if not self._made:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._made = True
        with open(self._tmp, "wb") as f:
            f.write(state.model_dump_json().encode())
        os.replace(self._tmp, self._target)


class RecordingLink(Link):
    """A ``Link`` that remembers the last report the agent queued (for the fleet's counts)."""

    last_report: ReportedState | None = None

    async def publish_reported(self, state: ReportedState) -> None:
        """Queue ``state`` like ``Link`` does and remember it."""
        await super().publish_reported(state)
        self.last_report = state


@dataclass(frozen=True)
class FleetOptions:
    """How the fleet connects and behaves."""

    broker_url: str = "mqtt://127.0.0.1:1883"
    """One URL, or the comma-separated nodes of a cluster: device i connects to node i mod n first and
    fails over to the others (drawn at random)."""
    protocol: str = "mqttv5"
    connect_rate: float = 500.0
    """New devices started per second."""
    heartbeat_s: float = 60.0
    """Each device's heartbeat is drawn within ±10 % of this, so reports do not come in lockstep."""
    keepalive_s: int = 60
    reconnect_max_s: int = 30
    subscribe_qos: int = 1
    """The agents' subscription QoS (0 on a RabbitMQ 3.10 cluster: see ``BrokerConfig.subscribe_qos``)."""
    settings: SimulationSettings = field(default_factory=SimulationSettings)
    seed: int = 0
    state_root: Path | None = None
    """Where the per-device state folders go (default: a fresh folder on /dev/shm, removed at the end)."""
    inline_file_io: bool = False
    """Run the agents' ``asyncio.to_thread`` file writes inline on the loop (``InlineExecutor``).

    For a state root on tmpfs, where a write is a memory copy and fsync returns at once: thousands of
    thread hops cost more than the writes and starve the event loop of the GIL. It replaces the
    loop's default executor, so only for a loop that runs nothing but the fleet (``edgectl simulate``).
    """
    tune_gc: bool = False
    """Keep the garbage collector off the fleet's long-lived objects (``gc.freeze`` as devices start,
    a larger first-generation threshold) while ``run`` runs: thousands of agents are millions of
    objects, and full collections that walk them all took over a third of the process's time. Frozen
    objects are never collected (cyclic garbage made before a freeze stays), and the setting is
    process-wide, so only for a process that runs nothing but the fleet (``edgectl simulate``).
    """


@dataclass
class Snapshot:
    """Counts at one moment: started, connected, and devices by the status of their last report."""

    devices: int
    started: int
    connected: int
    statuses: Counter[str]
    generations: Counter[int]
    elapsed_s: float

    def line(self) -> str:
        """``connected 4000/10000, started 4200; healthy 3900, applying 100 (12.3 s)``."""
        counts = ", ".join(f"{s} {self.statuses[s]}" for s in STATUSES if self.statuses[s])
        return (
            f"connected {self.connected}/{self.devices}, started {self.started}"
            + (f"; {counts}" if counts else "")
            + f" ({self.elapsed_s:.1f} s)"
        )

    @classmethod
    def merge(cls, parts: Iterable[Snapshot]) -> Snapshot:
        """The counts of several fleets (worker processes) added up; the longest elapsed time."""
        parts = list(parts)
        return cls(
            sum(p.devices for p in parts),
            sum(p.started for p in parts),
            sum(p.connected for p in parts),
            sum((p.statuses for p in parts), Counter()),
            sum((p.generations for p in parts), Counter()),
            max((p.elapsed_s for p in parts), default=0.0),
        )

    def as_dict(self) -> dict[str, object]:
        """JSON-ready counts."""
        return {
            "devices": self.devices,
            "started": self.started,
            "connected": self.connected,
            "statuses": {s: self.statuses[s] for s in STATUSES},
            "generations": {str(g): n for g, n in sorted(self.generations.items())},
            "elapsed_s": round(self.elapsed_s, 3),
        }


@dataclass
class _Member:
    device: SimDevice
    config: AgentConfig
    runtime: SimulatedRuntime
    link: RecordingLink | None = None
    agent: Agent | None = None
    task: asyncio.Task[None] | None = None
    error: BaseException | None = None


class SimulatedFleet:
    """``devices`` as simulated agents on one event loop; ``public_key`` verifies their desired states."""

    def __init__(
        self, devices: Sequence[SimDevice], public_key: Ed25519PublicKey, options: FleetOptions | None = None
    ) -> None:
        if not devices:
            raise ValueError("a fleet needs at least one device")
        ids = [d.device_id for d in devices]
        if len(set(ids)) != len(ids):
            raise ValueError("device ids in a fleet must be unique")
        self.options = options or FleetOptions()
        if self.options.connect_rate <= 0:
            raise ValueError(f"connect rate must be positive, got {self.options.connect_rate:g}")
        self.public_key = public_key
        self._own_root = self.options.state_root is None
        on_shm = self._own_root and os.path.isdir("/dev/shm")
        root = self.options.state_root or Path(
            tempfile.mkdtemp(prefix="edge-sim-", dir="/dev/shm" if on_shm else None)
        )
        self._store: type[StateStore] = TmpfsStateStore if on_shm else StateStore
        self.state_root = root
        rng = random.Random(self.options.seed)
        self.members = [self._member(i, d, rng) for i, d in enumerate(devices)]
        self._stop = asyncio.Event()
        self._started_at = time.monotonic()

    def _member(self, index: int, device: SimDevice, rng: random.Random) -> _Member:
        o = self.options
        urls = split_urls(o.broker_url)
        place = device.index if device.index is not None else index
        first = place % len(urls)  # spread the devices over the nodes of a cluster
        broker = BrokerConfig.model_validate(
            {
                "url": urls[first],
                "failover_urls": urls[first + 1 :] + urls[:first],
                "protocol": o.protocol,
                "username": device.username,
                "password": SecretStr(device.password) if device.password is not None else None,
                "keepalive_s": o.keepalive_s,
                "reconnect_max_s": o.reconnect_max_s,
                "subscribe_qos": o.subscribe_qos,
            }
        )
        config = AgentConfig(
            device_id=device.device_id,
            broker=broker,
            cloud_public_key=Path("/dev/null"),
            state_dir=self.state_root / device.device_id,
            runtime="process",
            heartbeat_s=o.heartbeat_s * rng.uniform(0.9, 1.1),
        )
        runtime = SimulatedRuntime(device.device_id, o.settings, seed=o.seed, profile=device.profile)
        return _Member(device, config, runtime)

    # ---- running -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Make ``run`` stop every agent and return."""
        self._stop.set()

    async def run(
        self,
        duration_s: float | None = None,
        progress: Callable[[Snapshot], None] | None = None,
        progress_s: float = 2.0,
    ) -> Snapshot:
        """Start the devices at the connect rate, run until ``duration_s`` or ``stop``; the final counts."""
        raise_open_files_limit(len(self.members) * 2 + 256)
        if self.options.inline_file_io:
            asyncio.get_running_loop().set_default_executor(InlineExecutor())
        thresholds = gc.get_threshold()
        if self.options.tune_gc:
            gc.set_threshold(*GC_THRESHOLDS)
        self._started_at = time.monotonic()
        reporter = asyncio.create_task(self._report(progress, progress_s)) if progress else None
        ramp = asyncio.create_task(self._ramp(), name="fleet-ramp")
        try:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._stop.wait(), duration_s)
            final = self.snapshot()
        finally:
            ramp.cancel()
            await asyncio.gather(ramp, return_exceptions=True)
            if reporter is not None:
                reporter.cancel()
                await asyncio.gather(reporter, return_exceptions=True)
            await self._shutdown()
            if self.options.tune_gc:
                gc.set_threshold(*thresholds)
                gc.unfreeze()
        return final

    async def _ramp(self) -> None:
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.options.connect_rate
        start = loop.time()
        for i, member in enumerate(self.members):
            delay = start + i * interval - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            member.task = asyncio.create_task(self._device(member), name=f"sim {member.device.device_id}")
            if self.options.tune_gc and i % GC_FREEZE_EVERY == GC_FREEZE_EVERY - 1:
                gc.freeze()
        if self.options.tune_gc:  # the last devices' sessions are still being set up
            await asyncio.sleep(GC_FREEZE_AFTER_S)
            gc.freeze()

    async def _device(self, member: _Member) -> None:
        config = member.config
        try:
            link = member.link = RecordingLink(config)
            async with link:
                member.agent = Agent(
                    config,
                    member.runtime,
                    link,
                    public_key=self.public_key,
                    prober=SimulatedProber(member.runtime, config.health_start_period_s),
                    store=self._store(config.state_dir / STATE_FILE),
                    metrics=AgentMetrics(),
                    accelerators=simulated_accelerators(member.device.profile),
                    sampler=SimulatedSampler(config.state_dir, member.runtime.rng),
                    local_report=False,
                )
                await member.agent.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            member.error = exc
            log.error("simulated device %s stopped: %s", member.device.device_id, exc)

    async def _report(self, progress: Callable[[Snapshot], None], every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            progress(self.snapshot())

    async def _shutdown(self) -> None:
        # In batches: thousands of clean disconnects at once would time out waiting for acks.
        started = [m for m in self.members if m.task is not None]
        for first in range(0, len(started), SHUTDOWN_BATCH):
            batch = started[first : first + SHUTDOWN_BATCH]
            for member in batch:
                if member.agent is not None:
                    member.agent.stop()
                elif member.task is not None:
                    member.task.cancel()  # still opening its link: nothing to stop cleanly yet
            await asyncio.gather(*(m.task for m in batch if m.task is not None), return_exceptions=True)
        if self._own_root:
            await asyncio.to_thread(shutil.rmtree, self.state_root, True)

    # ---- looking -------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """How many devices are started, connected, and in which deployment status, now."""
        statuses: Counter[str] = Counter()
        generations: Counter[int] = Counter()
        started = connected = 0
        for member in self.members:
            if member.task is not None:
                started += 1
            link = member.link
            if link is not None and link.connected:
                connected += 1
            report = link.last_report if link is not None else None
            if report is None:
                statuses["none"] += 1
            elif report.generation_applied == 0 and report.deployment_status == "healthy":
                statuses["waiting"] += 1
            else:
                statuses[report.deployment_status] += 1
                generations[report.generation_applied] += 1
        return Snapshot(
            len(self.members), started, connected, statuses, generations, time.monotonic() - self._started_at
        )

    def errors(self) -> dict[str, str]:
        """Devices whose agent stopped on an error, with the error."""
        return {m.device.device_id: str(m.error) for m in self.members if m.error is not None}

    async def wait_for(self, check: Callable[[Snapshot], bool], poll_s: float = 0.2) -> Snapshot:
        """Wait until ``check(snapshot)`` holds; the snapshot that passed."""
        while True:
            snap = self.snapshot()
            if check(snap):
                return snap
            await asyncio.sleep(poll_s)


def anonymous_devices(ids: Iterable[str], profiles: Sequence[str]) -> list[SimDevice]:
    """Devices without credentials (for a broker that allows anonymous clients)."""
    return [SimDevice(d, p) for d, p in zip(ids, profiles, strict=True)]


def _worker(
    index: int,
    devices: list[SimDevice],
    public_pem: bytes,
    options: FleetOptions,
    duration_s: float | None,
    progress_s: float,
    out: Any,
) -> None:
    """One worker process: run a fleet, send ``("progress"|"final"|"error", index, payload)`` to ``out``."""
    from modules.signing import load_public_key

    async def main() -> None:
        fleet = SimulatedFleet(devices, load_public_key(public_pem), options)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, fleet.stop)
        final = await fleet.run(duration_s, lambda snap: out.put(("progress", index, snap)), progress_s)
        out.put(("final", index, (final, fleet.errors())))

    try:
        event_loop_runner()(main())
    except Exception as exc:
        out.put(("error", index, f"{type(exc).__name__}: {exc}"))


def event_loop_runner() -> Callable[[Any], Any]:
    """``uvloop.run`` when uvloop is installed (faster with thousands of sockets), else ``asyncio.run``."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


def shares(devices: Sequence[SimDevice], processes: int) -> list[list[SimDevice]]:
    """``devices`` dealt round-robin to ``processes`` workers, each keeping its place in the whole fleet."""
    placed = [d if d.index is not None else replace(d, index=i) for i, d in enumerate(devices)]
    return [placed[i::processes] for i in range(processes)]


def run_in_processes(
    devices: Sequence[SimDevice],
    public_pem: bytes,
    options: FleetOptions,
    processes: int,
    duration_s: float | None = None,
    progress: Callable[[Snapshot], None] | None = None,
    progress_s: float = 2.0,
) -> tuple[Snapshot, dict[str, str]]:
    """Run ``devices`` split over ``processes`` worker processes; the summed final counts and errors.

    Each worker connects at ``connect_rate / processes`` so the broker sees the configured rate.
    SIGINT/SIGTERM (or Ctrl-C) stop every worker cleanly; the call returns when all have reported.
    """
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    processes = min(processes, len(devices))
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    share = replace(options, connect_rate=options.connect_rate / processes)
    workers = [
        ctx.Process(
            target=_worker,
            args=(i, part, public_pem, share, duration_s, progress_s, out),
            name=f"edge-sim-{i}",
        )
        for i, part in enumerate(shares(devices, processes))
    ]
    for worker in workers:
        worker.start()
    latest: dict[int, Snapshot] = {}
    finals: dict[int, Snapshot] = {}
    errors: dict[str, str] = {}
    last_print = time.monotonic()
    while len(finals) < processes:
        try:
            kind, index, payload = out.get(timeout=0.5)
        except queue.Empty:
            for i, worker in enumerate(workers):
                if i not in finals and not worker.is_alive():
                    errors[f"worker {i}"] = f"exited with code {worker.exitcode} before its summary"
                    finals[i] = latest.get(i) or Snapshot(0, 0, 0, Counter(), Counter(), 0.0)
            continue
        except KeyboardInterrupt:
            for worker in workers:
                if worker.pid is not None and worker.is_alive():
                    os.kill(worker.pid, signal.SIGTERM)
            continue
        if kind == "progress":
            latest[index] = payload
            if progress is not None and time.monotonic() - last_print >= progress_s * 0.9:
                last_print = time.monotonic()
                progress(Snapshot.merge(latest.values()))
        elif kind == "final":
            finals[index], worker_errors = payload
            errors.update(worker_errors)
        else:
            errors[f"worker {index}"] = payload
            finals[index] = latest.get(index) or Snapshot(0, 0, 0, Counter(), Counter(), 0.0)
    for worker in workers:
        worker.join(timeout=30)
    return Snapshot.merge(finals.values()), errors
