"""The reconcile loop with a recording fake runtime, a fake prober and an in-memory link.

Time is a clock the test moves; passes are driven one by one with ``reconcile_once``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Collection, Iterable
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.actions import Create, Pull, Remove, Restart, Start, Stop
from agent.agent import GC_EVERY_S, Agent
from agent.config import AgentConfig, BrokerConfig, RestartSettings
from agent.health import HealthResult, ProbeTarget
from agent.link import DesiredSlot
from agent.metrics import AgentMetrics
from agent.observed import ImageAvailability, ObservedModule
from agent.runtime import Observation, RuntimeActionError
from agent.state import StateStore
from modules.contract import (
    ClientConflict,
    CommandRequest,
    CommandResponse,
    DesiredState,
    HealthCheck,
    Heartbeat,
    ModuleHealth,
    ReportedState,
)
from modules.signing import generate_keypair, load_private_key, load_public_key, sign_desired

PRIVATE_PEM, PUBLIC_PEM = generate_keypair()
PRIVATE = load_private_key(PRIVATE_PEM)
PUBLIC = load_public_key(PUBLIC_PEM)
OTHER_PRIVATE = load_private_key(generate_keypair()[0])
DEVICE = "dev-1"
T0 = datetime(2026, 11, 21, 12, 0, tzinfo=timezone.utc)
WEB1 = "registry.local/web:1"
WEB2 = "registry.local/web:2"
API1 = "registry.local/api:1"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class FakeRuntime:
    """Records every runtime call; applies it to in-memory modules; ``fail`` injects errors."""

    def __init__(self, present: Iterable[str] = (WEB1, WEB2, API1)) -> None:
        self.modules: dict[str, ObservedModule] = {}
        self.present = set(present)
        self.calls: list[tuple[str, str]] = []
        self.fail: dict[tuple[str, str], str] = {}
        self.clock: Clock | None = None
        self.kept: list[set[str]] = []
        """What each ``collect_images`` call was told to keep."""

    def _record(self, kind: str, module: str) -> None:
        self.calls.append((kind, module))
        if (kind, module) in self.fail:
            raise RuntimeActionError(module, self.fail[(kind, module)])

    async def observe(self, images: Collection[str] = ()) -> Observation:
        return dict(self.modules), ImageAvailability(present=self.present & set(images))

    async def pull(self, action: Pull) -> None:
        self._record("pull", action.module)
        self.present.add(action.image)

    async def create(self, action: Create) -> None:
        self._record("create", action.module)
        self.modules[action.module] = ObservedModule(
            name=action.module, image=action.spec.image, status="created", config_hash=action.config_hash
        )

    async def start(self, action: Start) -> None:
        self._record("start", action.module)
        now = self.clock() if self.clock else T0
        self.modules[action.module] = replace(self.modules[action.module], status="running", started_at=now)

    async def restart(self, action: Restart) -> None:
        self._record("restart", action.module)
        now = self.clock() if self.clock else T0
        self.modules[action.module] = replace(self.modules[action.module], status="running", started_at=now)

    async def stop(self, action: Stop) -> None:
        self._record("stop", action.module)
        self.modules[action.module] = replace(self.modules[action.module], status="exited", exit_code=0)

    async def remove(self, action: Remove) -> None:
        self._record("remove", action.module)
        del self.modules[action.module]

    async def logs(self, module: str, tail: int = 100) -> str:
        if module not in self.modules:
            raise RuntimeActionError(module, "no such module")
        return "\n".join(f"{module} line {i}" for i in range(tail))

    def health_url(self, module: str, check: HealthCheck) -> str | None:
        o = self.modules.get(module)
        return f"http://fake/{module}" if o is not None and o.status == "running" else None

    async def collect_images(self, keep: Collection[str], now: datetime) -> list[str]:
        self.kept.append(set(keep))
        return []

    async def close(self) -> None:
        return None


class FakeProber:
    """Every probed module is live and ready unless its image is in ``broken``."""

    def __init__(self, runtime: FakeRuntime) -> None:
        self.runtime = runtime
        self.broken: set[str] = set()
        self.failures: dict[str, int] = {}

    async def check(self, targets: Iterable[ProbeTarget]) -> dict[str, HealthResult]:
        out = {}
        for t in targets:
            ok = self.runtime.modules[t.module].image not in self.broken
            self.failures[t.module] = 0 if ok else self.failures.get(t.module, 0) + 1
            error = None if ok else "liveness GET /: connection refused"
            health = ModuleHealth(live=ok, ready=ok, error=error)
            out[t.module] = HealthResult(
                health, self.failures[t.module], "CPUExecutionProvider" if ok else None
            )
        return out


class MemoryLink:
    """The link's surface, in memory: a desired slot, recorded reports and command answers."""

    def __init__(self) -> None:
        self.desired = DesiredSlot()
        self.client_conflict: ClientConflict | None = None
        self.sessions = 1
        self.reports: list[ReportedState] = []
        self.heartbeats: list[Heartbeat] = []
        self.responses: list[CommandResponse] = []
        self.requests: asyncio.Queue[CommandRequest] = asyncio.Queue()
        self.connected = True
        self.changed = asyncio.Event()
        self.announced: list[int] = []

    def also_wake_on_connect(self, event: asyncio.Event) -> None:
        self.on_connect = event

    async def commands(self) -> AsyncIterator[CommandRequest]:
        while True:
            yield await self.requests.get()

    async def publish_reported(self, state: ReportedState) -> None:
        self.reports.append(state)
        self.changed.set()

    async def publish_heartbeat(self, heartbeat: Heartbeat) -> None:
        self.heartbeats.append(heartbeat)

    def announce(self, generation: int) -> None:
        self.announced.append(generation)

    async def respond(self, response: CommandResponse) -> None:
        self.responses.append(response)
        self.changed.set()


def module(image: str, **kw: Any) -> dict[str, Any]:
    return {"image": image, "ports": [{"container": 5001}], **kw}


def desired(generation: int, modules: dict[str, Any], *, key: Any = PRIVATE, **kw: Any) -> bytes:
    state = DesiredState.model_validate(
        {
            "device_id": DEVICE,
            "generation": generation,
            "issued_at": T0 - timedelta(minutes=1),
            "expires_at": T0 + timedelta(days=1),
            "modules": modules,
            "health_deadline_s": 60,
            **kw,
        }
    )
    if key is not None:
        state = sign_desired(state, key)
    return state.model_dump_json().encode()


def without_image(raw: bytes) -> bytes:
    doc = json.loads(raw)
    del doc["modules"]["web"]["image"]
    return json.dumps(doc).encode()


class Rig:
    def __init__(self, tmp_path: Path, link: MemoryLink | None = None, runtime: FakeRuntime | None = None):
        self.clock = Clock()
        self.runtime = runtime or FakeRuntime()
        self.runtime.clock = self.clock
        self.prober = FakeProber(self.runtime)
        self.link = link
        self.config = AgentConfig(
            device_id=DEVICE,
            broker=BrokerConfig(url="mqtt://127.0.0.1:1883"),
            cloud_public_key=tmp_path / "cloud.pub",
            state_dir=tmp_path / "state",
            heartbeat_s=600,
            restart=RestartSettings(base_s=1, max_s=4),
        )
        self.agent = Agent(
            self.config,
            self.runtime,
            link,
            public_key=PUBLIC,
            prober=self.prober,
            accelerators=[],
            clock=self.clock,
            metrics=AgentMetrics(),
        )

    def send(self, raw: bytes) -> None:
        assert self.link is not None
        self.link.desired.put(raw)

    @property
    def report(self) -> ReportedState:
        assert self.link is not None
        return self.link.reports[-1]


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    return Rig(tmp_path, MemoryLink())


async def test_rejected_desired_states_are_reported_and_change_nothing(rig: Rig) -> None:
    cases = [
        (desired(1, {"web": module(WEB1)}, key=None), "signature: missing"),
        (desired(1, {"web": module(WEB1)}, key=OTHER_PRIVATE), "signature: mismatch"),
        (desired(1, {"web": module(WEB1)}, device_id="dev-2"), "for device 'dev-2'"),
        (b"{not json", "not JSON"),
        (without_image(desired(1, {"web": module(WEB1)})), "schema: modules.web.image: Field required"),
    ]
    for raw, reason in cases:
        rig.send(raw)
        await rig.agent.reconcile_once()
        assert rig.report.deployment_status == "rejected"
        assert reason in (rig.report.reason or "")
    assert rig.report.generation_applied == 0
    assert rig.runtime.calls == []
    assert rig.agent.state.last_applied is None
    assert sum(rig.agent.metrics.rejections.values()) == len(cases)


async def test_the_link_announces_the_generation_the_agent_has(rig: Rig) -> None:
    await rig.agent.load()
    assert rig.link is not None and rig.link.announced == [0]
    rig.send(desired(4, {"web": module(WEB1)}))
    await rig.agent.reconcile_once()
    assert rig.link.announced[-1] == 4
    rig.send(desired(5, {"web": module(WEB1)}, key=OTHER_PRIVATE))  # refused: still has 4
    await rig.agent.reconcile_once()
    assert rig.link.announced[-1] == 4


async def test_expired_and_stale_states_are_rejected_with_the_received_generation(rig: Rig) -> None:
    rig.send(desired(3, {"web": module(WEB1)}))
    await rig.agent.reconcile_once()
    calls = list(rig.runtime.calls)
    rig.send(desired(2, {"web": module(WEB2)}))
    await rig.agent.reconcile_once()
    # An older generation refused: generation 3 still runs, and its status stands; the refusal is
    # an event of its own.
    assert rig.report.deployment_status != "rejected" and rig.report.generation_applied == 3
    rejection = rig.report.last_rejection
    assert rejection is not None and (rejection.code, rejection.generation) == ("generation", 2)
    assert "not newer than applied generation 3" in rejection.reason
    rig.clock.advance(2 * 86400)
    rig.send(desired(4, {"web": module(WEB2)}))
    await rig.agent.reconcile_once()
    # A newer generation refused: the cloud's wish is not met, so the status says rejected.
    assert (rig.report.deployment_status, rig.report.generation_received) == ("rejected", 4)
    assert (rig.report.reason or "").startswith("expired at")
    assert rig.report.last_rejection is not None and rig.report.last_rejection.generation == 4
    assert rig.runtime.calls[len(calls) :] == []
    assert rig.report.generation_applied == 3


async def test_a_rejection_is_an_event_that_does_not_stick_to_the_status(rig: Rig) -> None:
    raw = desired(1, {"web": module(WEB1)})
    rig.send(raw)
    for _ in range(3):
        await rig.agent.reconcile_once()
    assert rig.report.deployment_status == "healthy"
    rig.send(b"[[[")  # garbage on the desired topic
    await rig.agent.reconcile_once()
    assert rig.report.deployment_status == "healthy", "a refused payload does not change what runs"
    rejection = rig.report.last_rejection
    assert rejection is not None and rejection.code == "not_json" and rejection.at == rig.clock.now
    rig.send(raw)  # the cloud publishes the valid signed state again
    await rig.agent.reconcile_once()
    rig.clock.advance(rig.config.heartbeat_s)
    await rig.agent.reconcile_once()  # and on every heartbeat after
    assert (rig.report.deployment_status, rig.report.generation_applied) == ("healthy", 1)
    assert rig.report.reason != rejection.reason
    assert rig.report.last_rejection == rejection  # kept as what it is: the last refusal


async def test_redelivery_of_the_applied_generation_is_not_a_rejection(rig: Rig) -> None:
    raw = desired(1, {"web": module(WEB1)})
    rig.send(raw)
    await rig.agent.reconcile_once()
    rig.send(raw)
    await rig.agent.reconcile_once()
    assert rig.report.deployment_status != "rejected"
    assert not rig.agent.metrics.rejections


async def test_apply_runs_actions_in_plan_order_then_becomes_known_good(rig: Rig) -> None:
    rig.runtime.present = set()
    rig.send(
        desired(
            1, {"web": module(WEB1, startup_order=2), "api": module(API1, startup_order=1)}, deployment="d"
        )
    )
    first = await rig.agent.reconcile_once()
    assert [(a.kind, a.module) for a in first.plan] == rig.runtime.calls == [("pull", "api"), ("pull", "web")]
    assert rig.report.deployment_status == "applying"
    assert {m.runtime_status for m in rig.report.modules.values()} == {"pulling"}
    assert first.wake_in_s <= 1.0
    second = await rig.agent.reconcile_once()
    assert rig.runtime.calls[2:] == [("create", "api"), ("start", "api"), ("create", "web"), ("start", "web")]
    assert [(a.kind, a.module) for a in second.plan] == rig.runtime.calls[2:]
    await rig.agent.reconcile_once()
    assert rig.report.deployment_status == "healthy"
    assert rig.report.modules["web"].runtime_status == "running"
    assert rig.report.modules["web"].execution_provider == "CPUExecutionProvider"
    stored = StateStore(rig.config.state_dir / "state.json").load()
    assert stored.last_known_good is not None and stored.last_known_good.generation == 1
    assert stored.status == "healthy"


async def test_failed_generation_rolls_back_after_the_deadline(rig: Rig) -> None:
    rig.send(desired(1, {"web": module(WEB1)}))
    for _ in range(3):
        await rig.agent.reconcile_once()
    assert rig.report.deployment_status == "healthy"
    rig.prober.broken.add(WEB2)
    rig.send(desired(2, {"web": module(WEB2)}))
    await rig.agent.reconcile_once()
    await rig.agent.reconcile_once()
    assert rig.report.deployment_status == "applying"
    assert "web: running, not live" in (rig.report.reason or "")
    rig.clock.advance(61)
    calls = len(rig.runtime.calls)
    await rig.agent.reconcile_once()
    assert rig.report.deployment_status == "rolled_back"
    assert "not healthy within 60 s" in (rig.report.reason or "")
    assert "rolled back to generation 1" in (rig.report.reason or "")
    assert rig.runtime.calls[calls:] == [
        ("stop", "web"),
        ("remove", "web"),
        ("create", "web"),
        ("start", "web"),
    ]
    assert rig.runtime.modules["web"].image == WEB1
    assert (rig.report.generation_applied, rig.report.generation_received) == (1, 2)
    assert rig.agent.metrics.rollbacks == 1
    rig.send(desired(2, {"web": module(WEB2)}))
    await rig.agent.reconcile_once()
    assert rig.report.deployment_status == "rolled_back"


async def test_failed_generation_without_rollback_stays_failed(rig: Rig) -> None:
    rig.prober.broken.add(WEB1)
    rig.send(desired(1, {"web": module(WEB1)}, rollback="none"))
    await rig.agent.reconcile_once()
    rig.clock.advance(61)
    await rig.agent.reconcile_once()
    assert rig.report.deployment_status == "failed"
    assert "not rolled back (rollback: none)" in (rig.report.reason or "")


async def test_restart_from_durable_state_without_a_broker(tmp_path: Path) -> None:
    first = Rig(tmp_path, MemoryLink())
    first.send(desired(5, {"web": module(WEB1), "api": module(API1)}))
    for _ in range(3):
        await first.agent.reconcile_once()
    # The device rebooted: the runtime lost its modules, and no broker is reachable.
    offline = Rig(tmp_path, link=None)
    result = await offline.agent.reconcile_once()
    assert sorted(offline.runtime.calls) == [
        ("create", "api"),
        ("create", "web"),
        ("start", "api"),
        ("start", "web"),
    ]
    assert result.report.generation_applied == 5
    # The agent alone restarted: its modules still run; nothing is created twice.
    again = Rig(tmp_path, link=None, runtime=offline.runtime)
    calls = len(offline.runtime.calls)
    result = await again.agent.reconcile_once()
    assert offline.runtime.calls[calls:] == []
    assert result.report.deployment_status == "healthy"


async def test_a_failing_action_is_retried_with_back_off_and_reported(rig: Rig) -> None:
    rig.runtime.fail[("create", "web")] = "create failed: port is already allocated"
    rig.send(desired(1, {"web": module(WEB1, startup_order=1), "api": module(API1)}))
    await rig.agent.reconcile_once()
    assert ("start", "api") in rig.runtime.calls and ("start", "web") not in rig.runtime.calls
    web = rig.report.modules["web"]
    assert web.runtime_status == "failed"
    assert "create web failed (1x)" in (web.message or "") and "port is already allocated" in (
        web.message or ""
    )
    held = await rig.agent.reconcile_once()
    assert rig.runtime.calls.count(("create", "web")) == 1
    assert held.run.wake_at == T0 + timedelta(seconds=1)
    del rig.runtime.fail[("create", "web")]
    rig.clock.advance(1)
    await rig.agent.reconcile_once()
    assert rig.runtime.calls.count(("create", "web")) == 2
    assert rig.runtime.modules["web"].status == "running"
    await rig.agent.reconcile_once()
    assert rig.report.modules["web"].message is None
    assert rig.agent.metrics.actions[("create", "failed")] == 1


async def test_idle_passes_back_off_and_publish_only_on_change(rig: Rig) -> None:
    assert rig.link is not None
    waits = [(await rig.agent.reconcile_once()).wake_in_s for _ in range(4)]
    assert waits == sorted(waits) and waits[-1] > waits[0] > 0
    assert len(rig.link.reports) == 1
    assert rig.report.reason == "no desired state received yet"
    rig.clock.advance(rig.config.heartbeat_s)
    heartbeat = await rig.agent.reconcile_once()
    assert heartbeat.published == "heartbeat" and len(rig.link.reports) == 1
    (beat,) = rig.link.heartbeats
    assert (beat.device_id, beat.report_at, beat.reported_at) == (
        DEVICE,
        rig.report.reported_at,
        rig.clock.now,
    )
    rig.clock.advance(rig.config.report_refresh_s)
    refresh = await rig.agent.reconcile_once()
    assert refresh.published == "report" and len(rig.link.reports) == 2, "the hourly refresh is a full report"


async def test_reports_carry_the_heartbeat_and_a_client_id_conflict_at_once(rig: Rig) -> None:
    assert rig.link is not None
    await rig.agent.reconcile_once()
    assert rig.report.heartbeat_s == rig.config.heartbeat_s and rig.report.client_conflict is None
    conflict = ClientConflict(detected_at=T0, takeovers=1, detail="another MQTT client connected as dev-1")
    rig.link.client_conflict = conflict
    published = await rig.agent.reconcile_once()
    assert published.published, "a conflict is news: it must not wait for the next heartbeat"
    assert rig.report.client_conflict == conflict


async def test_a_new_session_gets_a_fresh_report_before_the_heartbeat(rig: Rig) -> None:
    assert rig.link is not None
    await rig.agent.reconcile_once()
    rig.clock.advance(5)
    assert not (await rig.agent.reconcile_once()).published
    rig.link.sessions += 1  # the broker came back: the report queued offline is old by now
    fresh = await rig.agent.reconcile_once()
    assert fresh.published and rig.report.reported_at == rig.clock.now


async def test_running_modules_are_looked_at_every_health_interval(rig: Rig) -> None:
    rig.send(desired(1, {"web": module(WEB1, health={"interval_s": 2.5})}))
    await rig.agent.reconcile_once()
    passes = [await rig.agent.reconcile_once() for _ in range(5)]
    assert rig.report.deployment_status == "healthy"
    assert all(0 < p.wake_in_s <= 2.5 for p in passes)
    assert not passes[-1].published


async def test_commands_ping_logs_restart(rig: Rig) -> None:
    rig.send(desired(1, {"web": module(WEB1)}))
    await rig.agent.reconcile_once()
    handle = rig.agent.commands.handle
    ping = await handle(CommandRequest(id="p1", command="ping"))
    assert ping.ok and '"generation_applied":1' in ping.output
    logs = await handle(CommandRequest(id="l1", command="logs", module="web", tail=3))
    assert logs.ok and logs.output.splitlines() == ["web line 0", "web line 1", "web line 2"]
    restart = await handle(CommandRequest(id="r1", command="restart", module="web"))
    assert restart.ok and rig.runtime.calls[-1] == ("restart", "web")
    unknown = await handle(CommandRequest(id="r2", command="restart", module="nope"))
    assert not unknown.ok and "not in the desired state" in (unknown.error or "")
    rig.runtime.fail[("restart", "web")] = "restart failed: engine gone"
    failed = await handle(CommandRequest(id="r3", command="restart", module="web"))
    assert not failed.ok and "engine gone" in (failed.error or "")


async def test_run_answers_commands_and_wakes_on_desired(rig: Rig) -> None:
    assert rig.link is not None
    task = asyncio.create_task(rig.agent.run())
    rig.link.requests.put_nowait(CommandRequest(id="p1", command="ping"))
    rig.send(desired(1, {"web": module(WEB1)}))
    while not rig.link.responses or not any(r.deployment_status == "healthy" for r in rig.link.reports):
        await rig.link.changed.wait()
        rig.link.changed.clear()
    rig.agent.stop()
    await task
    assert rig.link.responses[0].id == "p1" and rig.link.responses[0].ok
    assert rig.agent.metrics.passes >= 2


async def test_a_failing_pass_is_logged_and_retried(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    assert rig.link is not None
    observe = rig.runtime.observe
    failures: list[str] = []

    async def engine_gone(images: Collection[str] = ()) -> Observation:
        if not failures:
            failures.append("once")
            raise ConnectionError("Docker Engine is not answering")
        return await observe(images)

    rig.runtime.observe = engine_gone  # type: ignore[method-assign]
    task = asyncio.create_task(rig.agent.run())
    while len(rig.link.reports) < 2:
        await rig.link.changed.wait()
        rig.link.changed.clear()
    rig.agent.stop()
    await task
    first = rig.link.reports[0]
    assert first.deployment_status == "failed"
    assert first.reason == (
        "reconcile pass failed (1 in a row): ConnectionError: Docker Engine is not answering"
    )
    assert failures == ["once"] and rig.report.reason == "no desired state received yet"
    assert "reconcile pass failed (1 in a row); next try in 1 s" in caplog.text


async def test_a_failing_pass_after_apply_reports_every_module_as_not_observed(rig: Rig) -> None:
    assert rig.link is not None
    rig.link.desired.put(desired(1, {"web": module("localhost:5000/web:1")}))
    await rig.agent.reconcile_once()

    async def engine_gone(images: Collection[str] = ()) -> Observation:
        raise ConnectionError("Docker Engine is not answering")

    rig.runtime.observe = engine_gone  # type: ignore[method-assign]
    before = len(rig.link.reports)
    task = asyncio.create_task(rig.agent.run())
    while len(rig.link.reports) == before:
        await rig.link.changed.wait()
        rig.link.changed.clear()
    rig.agent.stop()
    await task
    report = rig.link.reports[-1]
    assert report.deployment_status == "failed" and report.generation_applied == 1
    assert report.modules["web"].runtime_status == "failed"
    assert "not observed: reconcile pass failed" in (report.modules["web"].message or "")


def test_metrics_render() -> None:
    m = AgentMetrics(connected=lambda: True)
    m.passes = 7
    m.action("start", "ok")
    m.rejections["signature"] += 2
    m.set_modules(["running", "running", "backoff"])
    text = m.render()
    assert "edge_agent_reconcile_passes_total 7" in text
    assert 'edge_agent_actions_total{kind="start",result="ok"} 1' in text
    assert 'edge_agent_desired_rejections_total{code="signature"} 2' in text
    assert 'edge_agent_modules{status="running"} 2' in text
    assert "edge_agent_mqtt_connected 1" in text


async def test_the_runtime_collects_images_every_minute_keeping_the_applied_states(rig: Rig) -> None:
    assert rig.link is not None
    rig.link.desired.put(desired(1, {"web": module("localhost:5000/web:1")}))
    await rig.agent.reconcile_once()
    assert rig.runtime.kept and rig.runtime.kept[-1] == {"localhost:5000/web:1"}
    calls = len(rig.runtime.kept)
    await rig.agent.reconcile_once()
    assert len(rig.runtime.kept) == calls  # not again within GC_EVERY_S
    rig.clock.advance(GC_EVERY_S)
    await rig.agent.reconcile_once()
    assert len(rig.runtime.kept) == calls + 1
