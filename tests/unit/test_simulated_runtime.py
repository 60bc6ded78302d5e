"""The simulated runtime and prober on a clock the test moves, alone and under the real agent loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.actions import Create, Pull, Remove, Restart, Start, Stop
from agent.agent import Agent
from agent.config import AgentConfig, BrokerConfig
from agent.health import ProbeTarget
from agent.link import DesiredSlot
from agent.observed import config_hash
from agent.runtime import RuntimeActionError
from agent.runtime.simulated import SimulatedProber, SimulatedRuntime, SimulationSettings, execution_provider
from agent.state import AgentState, StateStore
from harness.simulate import TmpfsStateStore
from modules.contract import (
    ClientConflict,
    CommandRequest,
    CommandResponse,
    DesiredModule,
    DesiredState,
    HealthCheck,
    Heartbeat,
    ReportedState,
)
from modules.signing import generate_keypair, load_private_key, load_public_key, sign_desired

T0 = 1_800_000_000.0
IMAGE = "registry.local/digits:1"
PRIVATE_PEM, PUBLIC_PEM = generate_keypair()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now

    def utc(self) -> datetime:
        return datetime.fromtimestamp(self.now, timezone.utc)


async def no_sleep(seconds: float) -> None:
    return None


def runtime(clock: Clock, **settings: Any) -> SimulatedRuntime:
    fixed = {"pull_s": (2.0, 2.0), "start_s": (0.0, 0.0), "ready_s": (3.0, 3.0), **settings}
    return SimulatedRuntime("sim-1", SimulationSettings(**fixed), seed=7, clock=clock, sleep=no_sleep)


def spec(image: str = IMAGE, **kw: Any) -> DesiredModule:
    return DesiredModule(image=image, **kw)


async def created(rt: SimulatedRuntime, clock: Clock, name: str = "web", image: str = IMAGE) -> None:
    await rt.pull(Pull(module=name, reason="test", image=image))
    clock.now += 2.0
    m = spec(image)
    await rt.create(Create(module=name, reason="test", spec=m, config_hash=config_hash(m)))


async def test_a_pull_takes_its_time_then_the_image_is_present() -> None:
    clock = Clock()
    rt = runtime(clock)
    await rt.pull(Pull(module="web", reason="test", image=IMAGE))
    _, images = await rt.observe([IMAGE])
    assert images.is_pulling(IMAGE) and not images.is_present(IMAGE)
    assert rt.pulls.pulling == {IMAGE}
    clock.now += 2.0
    _, images = await rt.observe([IMAGE])
    assert images.is_present(IMAGE) and not images.pulling
    assert rt.pulls.pulling == frozenset()


async def test_failed_pulls_are_reported_with_their_attempts() -> None:
    clock = Clock()
    rt = runtime(clock, pull_failure_probability=1.0)
    for attempt in (1, 2):
        await rt.pull(Pull(module="web", reason="test", image=IMAGE))
        clock.now += 2.0
        _, images = await rt.observe([IMAGE])
        assert images.failed[IMAGE].attempts == attempt
        assert "simulated registry error" in images.failed[IMAGE].error
        assert not images.is_present(IMAGE)


async def test_create_needs_the_image_and_a_free_name() -> None:
    clock = Clock()
    rt = runtime(clock)
    m = spec()
    with pytest.raises(RuntimeActionError, match=r"module web: image .* is not present"):
        await rt.create(Create(module="web", reason="test", spec=m, config_hash=config_hash(m)))
    await created(rt, clock)
    with pytest.raises(RuntimeActionError, match="already exists"):
        await rt.create(Create(module="web", reason="test", spec=m, config_hash=config_hash(m)))
    with pytest.raises(RuntimeActionError, match="module api: does not exist"):
        await rt.start(Start(module="api", reason="test"))


async def test_a_started_module_loads_then_answers_ready_with_the_profile_provider() -> None:
    clock = Clock()
    rt = SimulatedRuntime(
        "sim-1",
        SimulationSettings(pull_s=(2, 2), start_s=(0, 0), ready_s=(3, 3)),
        profile="openvino-myriad",
        clock=clock,
        sleep=no_sleep,
    )
    prober = SimulatedProber(rt)
    await created(rt, clock)
    await rt.start(Start(module="web", reason="test"))
    observed, _ = await rt.observe()
    web = observed["web"]
    assert web.status == "running" and web.config_hash == config_hash(spec())
    check = HealthCheck(interval_s=1.0)
    target = ProbeTarget("web", rt.health_url("web", check) or "", check, web.started_at)
    first = (await prober.check([target]))["web"]
    assert first.health.live and not first.health.ready and first.health.error == "loading model"
    clock.now += 0.5
    assert (await prober.check([target]))["web"] is first  # not due before its interval
    clock.now += 3.0
    ready = (await prober.check([target]))["web"]
    assert ready.health.ready and ready.failures == 0
    assert ready.execution_provider == "openvino:MYRIAD" == execution_provider("openvino-myriad")


async def test_crashes_happen_after_the_drawn_time_and_restart_clears_them() -> None:
    clock = Clock()
    rt = runtime(clock, crash_probability=1.0, crash_after_s=(5.0, 5.0))
    await created(rt, clock)
    await rt.start(Start(module="web", reason="test"))
    clock.now += 4.9
    assert (await rt.observe())[0]["web"].status == "running"
    clock.now += 0.2
    crashed = (await rt.observe())[0]["web"]
    assert (crashed.status, crashed.exit_code) == ("exited", 137)
    assert crashed.finished_at == datetime.fromtimestamp(T0 + 2.0 + 5.0, timezone.utc)
    await rt.restart(Restart(module="web", reason="test"))
    assert (await rt.observe())[0]["web"].status == "running"


async def test_stop_and_remove() -> None:
    clock = Clock()
    rt = runtime(clock)
    await created(rt, clock)
    await rt.start(Start(module="web", reason="test"))
    await rt.stop(Stop(module="web", reason="test"))
    stopped = (await rt.observe())[0]["web"]
    assert (stopped.status, stopped.exit_code) == ("exited", 143)
    assert rt.health_url("web", HealthCheck()) is None
    await rt.remove(Remove(module="web", reason="test"))
    assert (await rt.observe())[0] == {}
    assert "does not exist" in str(await _error(rt.logs("web")))


async def _error(awaitable: Any) -> BaseException | None:
    try:
        await awaitable
    except Exception as exc:
        return exc
    return None


async def test_failing_liveness_probes_count_up_and_reset_on_a_new_start() -> None:
    clock = Clock()
    rt = runtime(clock, health_failure_probability=1.0)
    prober = SimulatedProber(rt, start_period_s=0.0)
    await created(rt, clock)
    await rt.start(Start(module="web", reason="test"))
    check = HealthCheck(interval_s=1.0)
    started = (await rt.observe())[0]["web"].started_at
    for expected in (1, 2, 3):
        result = (await prober.check([ProbeTarget("web", "sim://x", check, started)]))["web"]
        assert result.failures == expected and not result.health.live
        clock.now += 1.0
    await rt.restart(Restart(module="web", reason="test"))
    restarted = (await rt.observe())[0]["web"].started_at
    assert (await prober.check([ProbeTarget("web", "sim://x", check, restarted)]))["web"].failures == 1


async def test_failures_count_only_after_the_start_period_or_once_the_module_was_live() -> None:
    clock = Clock()
    rt = runtime(clock, health_failure_probability=1.0)
    prober = SimulatedProber(rt, start_period_s=5.0)
    await created(rt, clock)
    await rt.start(Start(module="web", reason="test"))
    check = HealthCheck(interval_s=2.0)
    started = (await rt.observe())[0]["web"].started_at
    seen = []
    for _ in range(5):
        result = (await prober.check([ProbeTarget("web", "sim://x", check, started)]))["web"]
        seen.append((result.failures, result.starting))
        clock.now += 2.0
    assert seen == [(0, True), (0, True), (0, True), (1, False), (2, False)]
    assert "starting: not counted" not in (result.health.error or "")

    rt.settings = SimulationSettings(**{**rt.settings.__dict__, "health_failure_probability": 0.0})
    await rt.restart(Restart(module="web", reason="test"))
    restarted = (await rt.observe())[0]["web"].started_at
    clock.now += 3.0  # ready
    live = (await prober.check([ProbeTarget("web", "sim://x", check, restarted)]))["web"]
    assert live.health.live and live.failures == 0 and not live.starting
    rt.settings = SimulationSettings(**{**rt.settings.__dict__, "health_failure_probability": 1.0})
    clock.now += 2.0
    failed = (await prober.check([ProbeTarget("web", "sim://x", check, restarted)]))["web"]
    assert failed.failures == 1, "a module that was live since its start counts at once"


async def test_the_end_of_a_pull_sets_the_wake_events() -> None:
    rt = SimulatedRuntime("sim-1", SimulationSettings(pull_s=(0.01, 0.01)))
    woken = asyncio.Event()
    rt.pulls.also_wake(woken)
    await rt.pull(Pull(module="web", reason="test", image=IMAGE))
    assert IMAGE in rt.pulls.pulling
    await asyncio.wait_for(woken.wait(), 10)
    assert not rt.pulls.pulling


def test_breakage_is_a_fixed_property_of_seed_device_module_and_configuration() -> None:
    settings = SimulationSettings(failure_rate=0.5)
    a = SimulatedRuntime("sim-1", settings, seed=3)
    b = SimulatedRuntime("sim-1", settings, seed=3)
    fates = [a.breakage("web", f"hash-{i}") for i in range(200)]
    assert fates == [b.breakage("web", f"hash-{i}") for i in range(200)]
    broken = [f for f in fates if f is not None]
    assert 50 < len(broken) < 150  # about half, both kinds
    assert {"crash-loop", "never-ready"} == set(broken)
    assert SimulatedRuntime("sim-1", SimulationSettings(failure_rate=0.0)).breakage("web", "h") is None
    assert SimulatedRuntime("sim-1", SimulationSettings(failure_rate=1.0)).breakage("web", "h") is not None


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"failure_rate": 1.5}, "failure_rate: a probability is between 0 and 1, got 1.5"),
        ({"crash_probability": -0.1}, "crash_probability: a probability"),
        ({"pull_s": (3.0, 1.0)}, "pull_s: expected 0 <= low <= high seconds, got 3..1"),
    ],
)
def test_bad_settings_name_the_field(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SimulationSettings(**settings)


# ---- under the real agent loop --------------------------------------------------------------------


class MemoryLink:
    def __init__(self) -> None:
        self.desired = DesiredSlot()
        self.client_conflict: ClientConflict | None = None
        self.sessions = 1
        self.reports: list[ReportedState] = []
        self.heartbeats: list[Heartbeat] = []
        self.connected = True

    def also_wake_on_connect(self, event: asyncio.Event) -> None:
        self.on_connect = event

    async def commands(self) -> AsyncIterator[CommandRequest]:
        raise NotImplementedError
        yield

    async def publish_reported(self, state: ReportedState) -> None:
        self.reports.append(state)

    async def publish_heartbeat(self, heartbeat: Heartbeat) -> None:
        self.heartbeats.append(heartbeat)

    def announce(self, generation: int) -> None:
        self.announced = generation

    async def respond(self, response: CommandResponse) -> None:
        raise NotImplementedError


def signed(generation: int, image: str, clock: Clock) -> bytes:
    state = DesiredState(
        device_id="sim-1",
        generation=generation,
        issued_at=clock.utc(),
        expires_at=clock.utc() + timedelta(days=1),
        modules={"web": DesiredModule(image=image, health=HealthCheck(interval_s=1.0))},
        health_deadline_s=30,
    )
    return sign_desired(state, load_private_key(PRIVATE_PEM)).model_dump_json().encode()


async def converge(agent: Agent, clock: Clock, link: MemoryLink, until: set[str]) -> ReportedState:
    for _ in range(400):
        result = await agent.reconcile_once()
        if link.reports and link.reports[-1].deployment_status in until:
            return link.reports[-1]
        clock.now += min(max(result.wake_in_s, 0.05), 1.0)
    raise AssertionError(f"no {until} report; last: {link.reports[-1] if link.reports else None}")


def agent_for(tmp_path: Path, clock: Clock, rt: SimulatedRuntime, link: MemoryLink) -> Agent:
    config = AgentConfig(
        device_id="sim-1",
        broker=BrokerConfig(url="mqtt://127.0.0.1:1883"),
        cloud_public_key=tmp_path / "cloud.pub",
        state_dir=tmp_path,
        heartbeat_s=3600,
    )
    return Agent(
        config,
        rt,
        link,
        public_key=load_public_key(PUBLIC_PEM),
        prober=SimulatedProber(rt),
        store=StateStore(tmp_path / "state.json"),
        accelerators=[],
        clock=clock.utc,
    )


async def test_the_agent_loop_brings_a_simulated_module_to_healthy(tmp_path: Path) -> None:
    clock = Clock()
    rt = runtime(clock)
    link = MemoryLink()
    agent = agent_for(tmp_path, clock, rt, link)
    link.desired.put(signed(1, IMAGE, clock))
    report = await converge(agent, clock, link, {"healthy", "failed", "rolled_back"})
    assert (report.deployment_status, report.generation_applied) == ("healthy", 1)
    assert report.modules["web"].runtime_status == "running"
    assert report.modules["web"].execution_provider == "CPUExecutionProvider"


async def test_a_broken_update_is_rolled_back_to_the_configuration_that_worked(tmp_path: Path) -> None:
    clock = Clock()
    rt = runtime(clock)
    link = MemoryLink()
    agent = agent_for(tmp_path, clock, rt, link)
    link.desired.put(signed(1, IMAGE, clock))
    assert (await converge(agent, clock, link, {"healthy"})).generation_applied == 1
    rt.settings = SimulationSettings(pull_s=(2, 2), start_s=(0, 0), ready_s=(3, 3), failure_rate=1.0)
    assert rt.breakage("web", config_hash(DesiredModule(image=IMAGE))) is not None  # every config now
    link.desired.put(signed(2, "registry.local/digits:2", clock))
    report = await converge(agent, clock, link, {"failed", "rolled_back"})
    assert (report.deployment_status, report.generation_applied) == ("rolled_back", 1)
    assert "generation 2 not healthy within 30 s: web:" in (report.reason or "")


def test_the_tmpfs_store_writes_what_the_real_store_reads(tmp_path: Path) -> None:
    path = tmp_path / "sim-1" / "state.json"
    store = TmpfsStateStore(path)
    first = AgentState(status="healthy", reason="first")
    store.save(first)
    second = AgentState(status="failed", reason="second")
    store.save(second)
    assert StateStore(path).load() == second
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]
