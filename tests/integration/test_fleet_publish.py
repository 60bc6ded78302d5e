"""Deployments to signed, retained desired states on a real Mosquitto; rollout waves from real reports.

Every wait is for a condition with a generous timeout; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from sqlalchemy import select, update

from cloud.config import resolve_settings
from cloud.fleet.controller import Controller, Status
from cloud.fleet.desired import EMPTY
from cloud.fleet.ingest import Ingestor
from cloud.fleet.removal import forget_device
from cloud.fleet.rollouts import advance_rollouts
from cloud.fleet.service import ApplyError, Fleet
from cloud.keys import load_or_create_signing_key, public_key_path
from cloud.store.db import open_database
from cloud.store.devices import Device, DeviceTag
from cloud.store.errors import NotFoundError
from cloud.store.fleet import DesiredRecord, OnlineRecord, ReportedRecord, RolloutDevice, RolloutRecord
from edgemqtt.bulk import PublishOutcome, Retained, publish_retained
from edgemqtt.endpoint import Endpoint
from modules.contract import DeploymentManifest, DesiredState, ModuleStatus, ReportedState
from modules.profiles import load_profiles
from modules.signing import load_public_key_file, verify_desired
from tests.integration.test_ingest import publish, until
from tests.services import MosquittoBroker, MosquittoFactory, wait_until

pytestmark = pytest.mark.integration

WAIT_S = 30.0


class Recorder:
    """A paho client that keeps the newest message per topic under ``edge/+/desired``."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.messages: dict[str, DesiredState] = {}
        self.count = 0
        self._subscribed = threading.Event()
        self._lock = threading.Lock()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"rec-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe("edge/+/desired", qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert self._subscribed.wait(WAIT_S), "recorder did not subscribe"

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        state = DesiredState.model_validate_json(message.payload)
        with self._lock:
            self.messages[state.device_id] = state
            self.count += 1

    def wait_for(self, devices: set[str], generation: int | None = None) -> dict[str, DesiredState]:
        def done() -> bool:
            with self._lock:
                got = {d: s for d, s in self.messages.items() if d in devices}
            return set(got) == devices and (
                generation is None or all(s.generation == generation for s in got.values())
            )

        assert wait_until(done, WAIT_S), (
            f"desired states for {sorted(devices)} not received: {sorted(self.messages)}"
        )
        return {d: self.messages[d] for d in devices}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    db = open_database(f"sqlite:///{tmp_path / 'edge.db'}")
    with db.transaction() as s:
        for device, profile, tags in [
            ("cam-1", "cpu", {"site": "a"}),
            ("cam-2", "tensorrt", {"site": "a"}),
            ("cam-3", "cuda", {"site": "a"}),
            ("gw-1", "cpu", {"site": "b"}),
        ]:
            s.add(Device(id=device, profile=profile, password_hash="unused"))
            s.flush()
            s.add_all(DeviceTag(device_id=device, key=k, value=v) for k, v in tags.items())
    f = Fleet(db, load_or_create_signing_key(tmp_path), load_profiles())
    yield f
    f.close()


def manifest(name: str = "vision", **changes: Any) -> DeploymentManifest:
    doc: dict[str, Any] = {
        "name": name,
        "target": {"tags": {"site": "a"}},
        "modules": {"detector": {"images": {"cpu": "reg.local/det:1-cpu", "cuda": "reg.local/det:1-cuda"}}},
    }
    doc.update(changes)
    return DeploymentManifest.model_validate(doc)


def endpoint(broker: MosquittoBroker) -> Endpoint:
    return Endpoint.parse(f"mqtt://{broker.host}:{broker.port}")


def generations(fleet: Fleet) -> dict[str, int]:
    with fleet.db.transaction() as s:
        return {d: g for d, g in s.execute(select(DesiredRecord.device_id, DesiredRecord.generation))}


def test_apply_publishes_signed_retained_states_per_profile(
    fleet: Fleet, mosquitto_factory: MosquittoFactory, tmp_path: Path
) -> None:
    broker = mosquitto_factory()
    result = fleet.apply(manifest(), endpoint=endpoint(broker))
    assert (result.selected, result.new_generations, result.publish.published, result.publish.pending) == (
        3,
        3,
        3,
        0,
    )

    recorder = Recorder(broker)  # subscribes after the publish: only retained messages can arrive
    try:
        states = recorder.wait_for({"cam-1", "cam-2", "cam-3"})
    finally:
        recorder.close()
    public = load_public_key_file(public_key_path(tmp_path))
    for state in states.values():
        verify_desired(state, public)
        assert state.generation == 1
        assert state.deployment == "vision"
    assert {d: s.modules["detector"].image for d, s in states.items()} == {
        "cam-1": "reg.local/det:1-cpu",
        "cam-2": "reg.local/det:1-cuda",  # tensorrt falls back to cuda
        "cam-3": "reg.local/det:1-cuda",
    }
    assert "gw-1" not in recorder.messages


def test_reapply_unchanged_publishes_nothing(fleet: Fleet, mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory()
    fleet.apply(manifest(), endpoint=endpoint(broker))
    before = generations(fleet)
    recorder = Recorder(broker)
    try:
        recorder.wait_for(set(before))
        retained = recorder.count
        again = fleet.apply(manifest(), endpoint=endpoint(broker))
        # Only the cuda image changes: the cuda and tensorrt devices run it (their cpu fallback
        # stays), the cpu device's content is unchanged.
        changed = fleet.apply(
            manifest(
                modules={
                    "detector": {"images": {"cpu": "reg.local/det:1-cpu", "cuda": "reg.local/det:2-cuda"}}
                }
            ),
            endpoint=endpoint(broker),
        )
        recorder.wait_for({"cam-2", "cam-3"}, generation=2)
    finally:
        recorder.close()
    assert (again.manifest_changed, again.new_generations, again.publish.published) == (False, 0, 0)
    assert (changed.new_generations, changed.publish.published) == (2, 2)
    assert generations(fleet) == {**before, "cam-2": 2, "cam-3": 2}
    assert recorder.count == retained + 2


def test_broker_down_at_apply_publishes_when_it_returns(
    fleet: Fleet, mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory()
    broker.stop()
    result = fleet.apply(manifest(), endpoint=endpoint(broker))
    assert (result.new_generations, result.publish.published, result.publish.pending) == (3, 0, 3)
    assert result.publish.error is not None and f"127.0.0.1:{broker.port}" in result.publish.error
    assert [d.name for d in fleet.list_deployments()] == ["vision"]
    assert {d.status for d in fleet.progress("vision").devices} == {"pending"}

    broker.start()
    report = fleet.publish_pending(endpoint(broker))
    assert (report.published, report.pending) == (3, 0)
    recorder = Recorder(broker)
    try:
        recorder.wait_for({"cam-1", "cam-2", "cam-3"}, generation=1)
    finally:
        recorder.close()
    assert fleet.pending_count() == 0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (
            manifest(target={"profile": "gpu"}),
            "manifest: target.profile: unknown device profile 'gpu' (known: cpu, cuda,",
        ),
        (
            manifest(modules={"detector": {"images": {"jetson": "reg.local/det:1"}}}),
            "manifest: modules.detector.images.jetson: unknown device profile 'jetson'",
        ),
        (
            manifest(target={"tags": {"site": "zz"}}),
            "manifest: target selects no provisioned device (tags site=zz)",
        ),
        (
            manifest(
                target={"profile": "cuda"}, modules={"detector": {"images": {"tensorrt": "reg.local/det:t"}}}
            ),
            "deployment 'vision': module 'detector' has no image for profile 'cuda' (tried cuda → cpu;",
        ),
    ],
)
def test_bad_manifest_stores_and_publishes_nothing(
    fleet: Fleet, mosquitto: MosquittoBroker, bad: DeploymentManifest, message: str
) -> None:
    with pytest.raises(ApplyError) as err:
        fleet.apply(bad, endpoint=endpoint(mosquitto))
    assert message in str(err.value)
    assert fleet.list_deployments() == []
    assert generations(fleet) == {}


def test_equal_priority_conflict_names_both_deployments(fleet: Fleet) -> None:
    fleet.apply(manifest())
    with pytest.raises(ApplyError) as err:
        fleet.apply(
            manifest("other", target={"device_ids": ["cam-1"]}, modules={"x": {"images": {"cpu": "r/x:1"}}})
        )
    assert str(err.value).startswith(
        "deployments 'other' and 'vision' have the same priority and give different modules to "
        "1 device(s) (cam-1)"
    )
    overriding = fleet.apply(
        manifest(
            "other", priority=5, target={"device_ids": ["cam-1"]}, modules={"x": {"images": {"cpu": "r/x:1"}}}
        )
    )
    assert overriding.winning == 1
    fleet.delete("other")
    assert generations(fleet)["cam-1"] == 3  # vision → other → vision again


def test_delete_leaves_devices_an_empty_desired_state(
    fleet: Fleet, mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory()
    fleet.apply(manifest(), endpoint=endpoint(broker))
    changed, report = fleet.delete("vision", endpoint=endpoint(broker))
    assert (changed, report.published) == (3, 3)
    recorder = Recorder(broker)
    try:
        states = recorder.wait_for({"cam-1", "cam-2", "cam-3"}, generation=2)
    finally:
        recorder.close()
    assert all(s.modules == {} and s.deployment is None for s in states.values())
    with fleet.db.transaction() as s:
        assert set(s.scalars(select(DesiredRecord.content_hash))) == {EMPTY.hash}


def report(device: str, generation: int, status: str, at: datetime | None = None) -> bytes:
    return (
        ReportedState(
            device_id=device,
            generation_applied=generation,
            generation_received=generation,
            deployment_status=status,
            agent_version="test",
            reported_at=at or datetime.now(timezone.utc),
        )
        .model_dump_json()
        .encode()
    )


def publish_reports(broker: MosquittoBroker, reports: dict[str, bytes]) -> None:
    publish(broker, [(f"edge/{d}/reported", p) for d, p in reports.items()])


async def test_rollout_waves_advance_on_healthy_reports_and_halt_with_revert(
    fleet: Fleet, mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory()
    ep = endpoint(broker)
    fleet.apply(manifest(), endpoint=ep)  # v1 everywhere, in one wave
    async with Ingestor(fleet.db, ep, flush_interval_s=0.05) as ingest:
        publish_reports(broker, {d: report(d, 1, "healthy") for d in ("cam-1", "cam-2", "cam-3")})
        assert await until(lambda: ingest.stats.written >= 3)
        assert fleet.advance_rollouts(endpoint=ep) == ["vision: all 1 wave(s) done"]

        v2 = manifest(
            modules={"detector": {"images": {"cpu": "reg.local/det:2-cpu", "cuda": "reg.local/det:2-cuda"}}},
            rollout={"waves": [1, 2], "max_failure_ratio": 0.0, "revert_on_halt": True},
        )
        applied = fleet.apply(v2, endpoint=ep)
        assert applied.waves == [1, 1, 1]
        assert generations(fleet) == {"cam-1": 2, "cam-2": 1, "cam-3": 1}
        assert [w.started for w in fleet.progress("vision").waves] == [True, False, False]
        assert fleet.advance_rollouts(endpoint=ep) == []  # cam-1 has not reported generation 2

        publish_reports(broker, {"cam-1": report("cam-1", 2, "healthy")})
        assert await until(lambda: ingest.stats.written >= 4)
        assert fleet.advance_rollouts(endpoint=ep) == ["vision: wave 1 done; starting wave 2"]
        assert generations(fleet) == {"cam-1": 2, "cam-2": 2, "cam-3": 1}

        publish_reports(broker, {"cam-2": report("cam-2", 2, "failed")})
        assert await until(lambda: ingest.stats.written >= 5)
        moved = fleet.advance_rollouts(endpoint=ep)
    assert moved == [
        "vision: halted and reverted the released devices: 1 of 2 released device(s) failed "
        "(50% > max_failure_ratio 0%)"
    ]
    progress = fleet.progress("vision")
    assert progress.rollout_state == "reverted"
    assert [(d.device, d.status) for d in progress.devices] == [
        ("cam-1", "reverted"),
        ("cam-2", "reverted"),
        ("cam-3", "waiting"),
    ]
    recorder = Recorder(broker)
    try:
        states = recorder.wait_for({"cam-1", "cam-2", "cam-3"})
    finally:
        recorder.close()
    assert {d: (s.generation, s.modules["detector"].image) for d, s in states.items()} == {
        "cam-1": (3, "reg.local/det:1-cpu"),
        "cam-2": (3, "reg.local/det:1-cuda"),
        "cam-3": (1, "reg.local/det:1-cuda"),
    }


V2 = {"detector": {"images": {"cpu": "reg.local/det:2-cpu", "cuda": "reg.local/det:2-cuda"}}}


def test_every_changing_apply_is_a_revision_and_rollback_applies_one_again(fleet: Fleet) -> None:
    first = fleet.apply(manifest(), source="v1.yaml")
    again = fleet.apply(manifest(), source="v1.yaml")
    second = fleet.apply(manifest(modules=V2), source="v2.yaml")
    assert (first.revision, again.revision, second.revision) == (1, None, 2), "unchanged: no revision"
    history = fleet.history("vision")
    assert [(r.number, r.source, r.current) for r in history] == [(1, "v1.yaml", False), (2, "v2.yaml", True)]
    assert history[1].images == {"detector": {"cpu": "reg.local/det:2-cpu", "cuda": "reg.local/det:2-cuda"}}

    number, target = fleet.revision("vision")
    assert number == 1 and target == manifest()
    back = fleet.apply(target, source=f"rollback to revision {number}")
    assert back.revision == 3 and back.new_generations == 3
    assert fleet.manifest("vision")[0] == manifest()
    assert [r.source for r in fleet.history("vision")][-1] == "rollback to revision 1"
    with pytest.raises(NotFoundError, match=r"has no revision 9 \(revisions: 1, 2, 3\)"):
        fleet.revision("vision", 9)
    fleet.delete("vision")
    with pytest.raises(NotFoundError, match="has no revisions"):
        fleet.history("vision")


async def test_resume_restarts_a_halted_rollout_and_retry_gives_failed_devices_a_new_generation(
    fleet: Fleet, mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory()
    ep = endpoint(broker)
    with pytest.raises(NotFoundError, match="deployment 'vision' does not exist"):
        fleet.resume("vision")
    fleet.apply(manifest(), endpoint=ep)
    async with Ingestor(fleet.db, ep, flush_interval_s=0.05) as ingest:
        publish_reports(broker, {d: report(d, 1, "healthy") for d in ("cam-1", "cam-2", "cam-3")})
        assert await until(lambda: ingest.stats.written >= 3)
        fleet.advance_rollouts(endpoint=ep)
        assert fleet.resume("vision")[0] == "the rollout is complete, not halted: nothing to resume"
        fleet.apply(manifest(modules=V2, rollout={"waves": [2, 3], "max_failure_ratio": 0.0}), endpoint=ep)
        assert generations(fleet) == {"cam-1": 2, "cam-2": 2, "cam-3": 1}
        publish_reports(
            broker, {"cam-1": report("cam-1", 2, "healthy"), "cam-2": report("cam-2", 2, "rolled_back")}
        )
        assert await until(lambda: ingest.stats.written >= 5)
        assert fleet.advance_rollouts(endpoint=ep)[0].startswith(
            "vision: halted: 1 of 2 released device(s) failed"
        )
        assert fleet.progress("vision").rollout_state == "halted"

        what, new, sent = fleet.resume("vision", endpoint=ep)
        assert sent.error is None
        assert what == "resumed by the operator at wave 1 (was halted)" and new == 0
        assert fleet.progress("vision").rollout_state == "rolling"
        assert generations(fleet) == {"cam-1": 2, "cam-2": 2, "cam-3": 1}, "resume alone re-issues nothing"

        fleet.advance_rollouts(endpoint=ep)  # halts again: cam-2 still reports its rollback
        what, new, sent = fleet.resume("vision", retry=True, endpoint=ep)
        assert sent.published == 1, "the new generation went out"
        assert what.endswith("; 1 failed or rolled-back device(s) get a new generation") and new == 1
        assert generations(fleet) == {"cam-1": 2, "cam-2": 3, "cam-3": 1}, "same content, a new generation"


async def test_a_controller_that_starts_late_judges_deadlines_from_the_reports(
    fleet: Fleet, mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory()
    ep = endpoint(broker)
    applied_at = datetime.now(timezone.utc)
    fleet.apply(manifest(health_deadline_s=60), endpoint=ep)
    devices = ("cam-1", "cam-2", "cam-3")
    late = applied_at + timedelta(seconds=113)  # no controller ran until now
    async with Ingestor(fleet.db, ep, flush_interval_s=0.05) as ingest:
        # What the store knows when the late controller looks: the devices were applying at once.
        publish_reports(
            broker, {d: report(d, 1, "applying", applied_at + timedelta(seconds=1)) for d in devices}
        )
        assert await until(lambda: ingest.stats.written >= 3)
        with fleet.db.transaction() as s:
            assert advance_rollouts(s, late) == [], "devices not heard from since the deadline were failed"
        # Their healthy reports (made long before) arrive: the rollout completes, nothing halted.
        publish_reports(
            broker, {d: report(d, 1, "healthy", applied_at + timedelta(seconds=2)) for d in devices}
        )
        assert await until(lambda: ingest.stats.written >= 6)
        with fleet.db.transaction() as s:
            assert advance_rollouts(s, late) == ["vision: all 1 wave(s) done"]

        # A device that says, after the deadline, that it is still applying does count as failed.
        v2 = {"detector": {"images": {"cpu": "reg.local/det:2-cpu", "cuda": "reg.local/det:2-cuda"}}}
        fleet.apply(
            manifest(health_deadline_s=60, modules=v2, rollout={"max_failure_ratio": 0.0}), endpoint=ep
        )
        with fleet.db.transaction() as s:  # the wave started 2 minutes ago
            s.execute(
                update(RolloutRecord).values(
                    wave_started_at=datetime.now(timezone.utc) - timedelta(minutes=2)
                )
            )
        publish_reports(broker, {"cam-1": report("cam-1", 2, "applying")})
        assert await until(lambda: ingest.stats.written >= 7)
        with fleet.db.transaction() as s:
            moved = advance_rollouts(s, datetime.now(timezone.utc))
    assert len(moved) == 1 and "halted" in moved[0] and "released device(s) failed" in moved[0], moved


async def test_a_wave_emptied_by_removed_devices_keeps_the_wave_numbers(
    fleet: Fleet, mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory()
    ep = endpoint(broker)
    assert fleet.apply(manifest(rollout={"waves": [1, 2]}), endpoint=ep).waves == [1, 1, 1]
    with fleet.db.transaction() as s:  # what DeviceManager.remove does to the fleet
        s.delete(s.get(Device, "cam-2"))
        forget_device(s, "cam-2")
    async with Ingestor(fleet.db, ep, flush_interval_s=0.05) as ingest:
        publish_reports(broker, {"cam-1": report("cam-1", 1, "healthy")})
        assert await until(lambda: ingest.stats.written >= 1)
    assert fleet.advance_rollouts(endpoint=ep) == ["vision: wave 1 done; starting wave 2"]
    assert fleet.advance_rollouts(endpoint=ep) == ["vision: wave 2 done; starting wave 3"]
    assert generations(fleet) == {"cam-1": 1, "cam-3": 1}
    progress = fleet.progress("vision")
    assert [(w.devices, w.started) for w in progress.waves] == [(1, True), (0, True), (1, True)]
    assert [(d.device, d.wave) for d in progress.devices] == [("cam-1", 0), ("cam-3", 2)]


def add_cpu_device(data: Path, device: str, **tags: str) -> None:
    """Register ``device`` (profile cpu) straight in the data directory's database, as the CLI sees it."""
    db = open_database(f"sqlite:///{data / 'edgedeploy.db'}")
    with db.transaction() as s:
        s.add(Device(id=device, profile="cpu", password_hash="unused"))
        s.flush()
        s.add_all(DeviceTag(device_id=device, key=k, value=v) for k, v in tags.items())
    db.dispose()


def test_cli_apply_status_and_offline_logs(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from cloud.cli import main

    data = tmp_path / "data"
    add_cpu_device(data, "cam-1", site="a")
    (tmp_path / "vision.yaml").write_text(
        "name: vision\ntarget: {tags: {site: a}}\nmodules:\n  detector:\n    images: {cpu: reg.local/det:1}\n"
    )
    broker = mosquitto_factory()
    broker.stop()
    common = ["--data-dir", str(data), "--broker-url", f"mqtt://127.0.0.1:{broker.port}"]

    assert main(["deploy", "apply", "-f", str(tmp_path / "vision.yaml"), *common]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(
        "deployment vision created: 1 device(s) selected, 1 run it (waves: 1); 1 new desired"
    )
    assert "1 desired state(s) are stored and pending" in err

    broker.start()
    assert main(["deploy", "publish", *common]) == 0
    assert capsys.readouterr().out == "1 desired state(s) published, 0 pending\n"

    assert main(["deploy", "status", "vision", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "cam-1   1     1           pending  no report yet for generation 1" in out

    # A failing device: deploy status shows the module detail that explains it.
    failed = ReportedState(
        device_id="cam-1",
        generation_applied=1,
        generation_received=1,
        deployment_status="failed",
        reason="detector is unhealthy",
        agent_version="test",
        modules={
            "detector": ModuleStatus(
                runtime_status="backoff", exit_code=3, restart_count=4, message="init() failed"
            )
        },
    )
    db = open_database(f"sqlite:///{data / 'edgedeploy.db'}")
    with db.transaction() as s:
        now = datetime.now(timezone.utc)
        s.add(
            ReportedRecord(
                device_id="cam-1", generation_applied=1, generation_received=1, deployment_status="failed",
                reason=failed.reason, payload=failed.model_dump_json(), reported_at=now, received_at=now,
            )
        )  # fmt: skip
    db.dispose()
    assert main(["deploy", "status", "vision", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    explained = "cam-1: failed: detector is unhealthy\n  detector: backoff, health -, restarts 4, exit 3\n"
    assert explained + "    init() failed" in out, out
    assert main(["deploy", "status", "vision", "--data-dir", str(data), "--json"]) == 0
    detail = json.loads(capsys.readouterr().out)["failing_modules"]
    assert detail["cam-1"]["detector"]["exit_code"] == 3

    db = open_database(f"sqlite:///{data / 'edgedeploy.db'}")
    with db.transaction() as s:
        since = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
        s.add(OnlineRecord(device_id="cam-1", online=False, since=since, received_at=since))
    db.dispose()
    assert main(["logs", "cam-1", "detector", *common]) == 1
    assert capsys.readouterr().err == (
        "edgectl: error: device cam-1 is offline since 2026-03-01T12:00:00Z; logs was not sent\n"
    )
    assert main(["deploy", "show", "nope", "--data-dir", str(data)]) == 2
    assert capsys.readouterr().err == "edgectl: error: deployment 'nope' does not exist\n"


def test_apply_shows_the_diff_and_a_dry_run_changes_nothing(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from cloud.cli import main

    data = tmp_path / "data"
    add_cpu_device(data, "cam-1")
    manifest = "name: vision\ntarget: {device_ids: [cam-1]}\nmodules:\n  detector:\n"
    manifest += "    images: {cpu: reg.local/det:%d}\n"
    (tmp_path / "vision.yaml").write_text(manifest % 1)
    broker = mosquitto_factory()
    common = ["--data-dir", str(data), "--broker-url", f"mqtt://127.0.0.1:{broker.port}"]
    assert main(["deploy", "apply", "-f", str(tmp_path / "vision.yaml"), *common]) == 0
    assert capsys.readouterr().out.startswith("deployment vision created"), "no diff for a new deployment"

    (tmp_path / "vision.yaml").write_text(manifest % 2)
    assert main(["deploy", "apply", "-f", str(tmp_path / "vision.yaml"), "--dry-run", *common]) == 0
    out = capsys.readouterr().out
    assert "-      cpu: reg.local/det:1\n+      cpu: reg.local/det:2\n" in out
    assert out.strip().endswith(
        "dry run: deployment vision would be updated: 1 device(s) selected, 1 would run it (waves: 1); "
        "1 new desired state(s); nothing was stored or published\n"
        "  detector from 'vision' on 1 device(s): cam-1"
    )
    assert main(["deploy", "show", "vision", "--json", "--data-dir", str(data)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["manifest"]["modules"]["detector"]["images"] == {"cpu": "reg.local/det:1"}, "nothing stored"

    assert main(["deploy", "apply", "-f", str(tmp_path / "vision.yaml"), "--json", *common]) == 0
    applied = json.loads(capsys.readouterr().out)
    assert applied["dry_run"] is False and applied["new_generations"] == 1
    assert "+      cpu: reg.local/det:2" in applied["diff"]
    assert main(["deploy", "apply", "-f", str(tmp_path / "vision.yaml"), *common]) == 0
    assert capsys.readouterr().out.startswith("deployment vision unchanged"), "no diff when equal"

    assert main(["deploy", "history", "vision", "--data-dir", str(data)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["REV", "APPLIED", "IMAGES", "MODELS", "SOURCE"]
    assert [line.split()[0] for line in table[1:]] == ["1", "2"]
    assert "detector=reg.local/det:2" in table[2] and table[2].split()[1] == "*"
    assert main(["deploy", "rollback", "vision", "--dry-run", *common]) == 0
    out = capsys.readouterr().out
    assert "-      cpu: reg.local/det:2\n+      cpu: reg.local/det:1\n" in out
    assert "dry run: rolling vision back to revision 1 would issue 1 new desired state(s)" in out
    assert main(["deploy", "rollback", "vision", *common]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == (
        "deployment vision rolled back to revision 1 (revision 3): "
        "1 new desired state(s), 1 published, 0 pending"
    )
    assert main(["deploy", "rollback", "vision", "--to", "7", *common]) == 2
    assert "has no revision 7 (revisions: 1, 2, 3)" in capsys.readouterr().err
    assert main(["deploy", "resume", "vision", *common]) == 0
    assert (
        "not halted: nothing to resume; 0 new desired state(s), 0 published, 0 pending"
        in capsys.readouterr().out
    )
    assert main(["deploy", "explain", "cam-1", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "device cam-1 (profile cpu; images tried in order: cpu)"
    assert out[2].startswith("  vision  priority 0, applied ") and out[2].endswith(": wins")
    assert out[-1] == "  detector  from 'vision': reg.local/det:1 (profile cpu, the device's profile)"
    assert main(["deploy", "explain", "nope", "--data-dir", str(data)]) == 2
    assert "device 'nope' is not registered" in capsys.readouterr().err


def test_set_model_packages_pushes_and_rolls_out(
    tmp_path: Path,
    mosquitto_factory: MosquittoFactory,
    registry: Any,
    docker_client: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Docker Engine, the image registry and the cpu base image are real; skipped loudly without them."""
    from cloud.cli import main
    from cloud.store import Registry
    from tests.integration.test_base_image import cpu_base_or_skip
    from tests.integration.test_packaging import train_digits

    cpu_base_or_skip(registry, docker_client)
    data = tmp_path / "data"
    store = Registry.open(resolve_settings(data))
    try:
        store.register(train_digits(tmp_path / "v1", (32,), seed=0), "digits")
    finally:
        store.close()
    add_cpu_device(data, "cam-1")
    (tmp_path / "vision.yaml").write_text(
        "name: vision\ntarget: {device_ids: [cam-1]}\n"
        "modules:\n  digits:\n    images: {cpu: reg.local/digits:0}\n"
    )
    broker = mosquitto_factory()
    common = ["--data-dir", str(data), "--broker-url", f"mqtt://127.0.0.1:{broker.port}"]
    assert main(["deploy", "apply", "-f", str(tmp_path / "vision.yaml"), *common]) == 0

    code = main(
        ["deploy", "set-model", "vision", "digits", "digits:1", "--registry", registry.address, *common]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "deployment vision now uses digits:1: 1 new desired state(s), 1 published, 0 pending" in out

    recorder = Recorder(broker)
    try:
        state = recorder.wait_for({"cam-1"}, generation=2)["cam-1"]
    finally:
        recorder.close()
    image = state.modules["digits"].image
    assert image.startswith(f"{registry.address}/digits@sha256:")
    assert main(["deploy", "show", "vision", "--json", "--data-dir", str(data)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["models"] == ["digits:1"]
    assert shown["manifest"]["modules"]["digits"]["images"] == {"cpu": image}


def test_recompute_picks_up_new_devices_and_re_signs_before_expiry(tmp_path: Path) -> None:
    now = [datetime(2026, 1, 1, tzinfo=timezone.utc)]
    db = open_database(f"sqlite:///{tmp_path / 'edge.db'}")
    with db.transaction() as s:
        s.add(Device(id="cam-1", profile="cpu", password_hash="unused"))
    fleet = Fleet(
        db, load_or_create_signing_key(tmp_path), load_profiles(), clock=lambda: now[0], ttl=timedelta(days=2)
    )
    try:
        fleet.apply(manifest(target={"profile": "cpu"}))
        with db.transaction() as s:
            s.add(Device(id="cam-9", profile="cpu", password_hash="unused"))
        assert fleet.recompute() == 1  # the new device
        assert generations(fleet) == {"cam-1": 1, "cam-9": 1}
        now[0] += timedelta(hours=23)
        assert fleet.recompute() == 0  # less than half the validity used
        now[0] += timedelta(hours=2)
        assert fleet.recompute() == 2  # past half: re-signed with the next generation
        assert generations(fleet) == {"cam-1": 2, "cam-9": 2}
        with db.transaction() as s:
            state = DesiredState.model_validate_json(s.get(DesiredRecord, "cam-1").payload)  # type: ignore[union-attr]
        assert state.expires_at == now[0] + timedelta(days=2)
    finally:
        fleet.close()


# ---- the controller ------------------------------------------------------------------------------


async def test_controller_rides_out_the_broker_being_down_and_publishes_what_is_owed(
    fleet: Fleet, mosquitto_factory: MosquittoFactory
) -> None:
    """``deploy watch`` and ``edgectl serve`` run this: retry until the broker answers, then catch up;
    the same when the broker goes away while it runs."""
    broker = mosquitto_factory()
    broker.stop()
    fleet.apply(manifest())  # stored, nothing published
    warnings: list[str] = []
    status = Status()
    controller = Controller(
        fleet,
        endpoint(broker),
        interval_s=0.05,
        recompute_every_s=0.05,
        retry_s=0.1,
        status=status,
        warn=warnings.append,
    )
    task = asyncio.create_task(controller.run())
    try:
        assert await until(lambda: bool(warnings))
        assert not status.connected and status.error is not None
        assert f"cannot reach the MQTT broker at {endpoint(broker).url}" in warnings[0]

        await asyncio.to_thread(broker.start)
        assert await until(lambda: status.connected and fleet.pending_count() == 0)
        with fleet.db.transaction() as s:  # provisioned after the apply: the next recompute covers it
            s.add(Device(id="cam-4", profile="cpu", password_hash="unused"))
            s.flush()
            s.add(DeviceTag(device_id="cam-4", key="site", value="a"))
        publish_reports(broker, {"cam-1": report("cam-1", 1, "healthy")})
        assert await until(lambda: status.ingest.written >= 1 and "cam-4" in generations(fleet))
        assert await until(lambda: fleet.pending_count() == 0)

        await asyncio.to_thread(broker.stop)  # lost while running: stored states wait for it
        assert await until(lambda: not status.connected)
        fleet.apply(manifest(modules={"detector": {"images": {"cpu": "reg.local/det:2-cpu"}}}))
        assert await until(lambda: "cannot reach the MQTT broker" in (status.error or ""))
        await asyncio.to_thread(broker.start)
        assert await until(lambda: status.connected and fleet.pending_count() == 0)
        publish_reports(broker, {"cam-4": report("cam-4", 2, "healthy")})
        assert await until(lambda: status.ingest.written >= 2)  # the ingester is back as well
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    recorder = Recorder(broker)
    try:
        states = recorder.wait_for({"cam-1", "cam-2", "cam-3", "cam-4"}, generation=2)
    finally:
        recorder.close()
    assert states["cam-4"].modules["detector"].image == "reg.local/det:2-cpu"
    assert status.passes > 0 and status.error is None


async def test_watch_until_settled_exits_when_the_rollout_completes(
    fleet: Fleet, mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory()
    fleet.apply(manifest(), endpoint=endpoint(broker))
    publish_reports(broker, {d: report(d, 1, "healthy") for d in ("cam-1", "cam-2", "cam-3")})
    lines: list[str] = []
    controller = Controller(fleet, endpoint(broker), interval_s=0.05, say=lines.append)
    await asyncio.wait_for(controller.run(until_settled=True), WAIT_S)
    assert "vision: all 1 wave(s) done" in lines
    assert lines[-1] == "no rollout in progress (3 report(s) ingested)"


# ---- removing a device ---------------------------------------------------------------------------


def retained(broker: MosquittoBroker, device: str) -> dict[str, bytes]:
    """The retained messages under ``edge/{device}/``: Mosquitto sends them on subscribe, before a
    marker published after the SUBACK, so the marker's arrival means all of them are in."""
    got: dict[str, bytes] = {}
    marker = f"test/marker/{uuid.uuid4().hex}"
    subscribed, done = threading.Event(), threading.Event()

    def on_message(_c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        if m.topic == marker:
            done.set()
        else:
            got[m.topic] = bytes(m.payload)

    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.subscribe([(f"edge/{device}/#", 1), (marker, 1)])
        assert subscribed.wait(WAIT_S), "no SUBACK"
        client.publish(marker, b"x", qos=1)
        assert done.wait(WAIT_S), "the marker did not come back"
    finally:
        client.disconnect()
        client.loop_stop()
    return got


def fleet_rows(data: Path, device: str) -> list[str]:
    db = open_database(f"sqlite:///{data / 'edgedeploy.db'}")
    try:
        with db.transaction() as s:
            return [
                table.__tablename__
                for table in (DesiredRecord, ReportedRecord, OnlineRecord, RolloutDevice)
                if s.scalars(select(table).where(table.device_id == device)).first() is not None
            ]
    finally:
        db.dispose()


async def test_device_remove_deletes_fleet_rows_and_clears_retained_messages(
    tmp_path: Path,
    mosquitto_factory: MosquittoFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Through ``edgectl``; the broker is up for cam-8 and down when cam-9 is removed."""
    from cloud.cli import main

    broker = mosquitto_factory()
    data = tmp_path / "data"
    monkeypatch.setenv("EDGE_BROKER_URL", f"mqtt://{broker.host}:{broker.port}")
    common = ["--data-dir", str(data)]
    (tmp_path / "vision.yaml").write_text(
        "name: vision\ntarget: {tags: {site: a}}\nmodules:\n  detector:\n    images: {cpu: reg.local/det:1}\n"
    )
    for device in ("cam-8", "cam-9"):
        assert main(["device", "add", device, "--tag", "site=a", *common]) == 0
    assert main(["deploy", "apply", "-f", str(tmp_path / "vision.yaml"), *common]) == 0
    publish_reports(broker, {d: report(d, 1, "healthy") for d in ("cam-8", "cam-9")})
    fleet = Fleet.open(resolve_settings(data))
    try:
        async with Ingestor(fleet.db, endpoint(broker), flush_interval_s=0.05) as ingest:
            assert await until(lambda: ingest.stats.written >= 2)
    finally:
        fleet.close()
    capsys.readouterr()
    assert fleet_rows(data, "cam-8") == ["device_desired", "device_reported", "rollout_devices"]
    assert set(retained(broker, "cam-8")) == {"edge/cam-8/desired", "edge/cam-8/reported"}

    assert main(["device", "remove", "cam-8", "--json", *common]) == 0
    removed = json.loads(capsys.readouterr().out)
    assert (removed["retained_cleared"], removed["retained_pending"]) == (["cam-8"], [])
    assert fleet_rows(data, "cam-8") == []
    assert retained(broker, "cam-8") == {}
    assert set(retained(broker, "cam-9")) == {"edge/cam-9/desired", "edge/cam-9/reported"}

    broker.stop()
    assert main(["device", "remove", "cam-9", *common]) == 0
    err = capsys.readouterr().err
    assert "warning: the retained messages of cam-9 are not cleared yet" in err
    assert fleet_rows(data, "cam-9") == []
    assert main(["device", "add", "cam-9", *common]) == 2
    assert "has not yet cleared its retained messages" in capsys.readouterr().err

    broker.start()
    assert set(retained(broker, "cam-9")) == {"edge/cam-9/desired", "edge/cam-9/reported"}
    assert main(["deploy", "publish", *common]) == 0
    assert retained(broker, "cam-9") == {}
    assert main(["device", "add", "cam-9", "--tag", "site=a", *common]) == 0
    assert main(["deploy", "publish", *common]) == 0
    assert "1 new desired state(s)" in capsys.readouterr().out
    recorder = Recorder(broker)
    try:
        assert recorder.wait_for({"cam-9"})["cam-9"].generation == 1
    finally:
        recorder.close()


def test_bulk_publisher_frames_every_payload_size_and_refuses_bad_credentials(
    mosquitto_factory: MosquittoFactory, tmp_path: Path
) -> None:
    """Remaining lengths of one to four bytes, an empty payload (clears), a non-ASCII topic."""
    broker = mosquitto_factory()
    sizes = [0, 1, 120, 200, 16_000, 17_000, 2_200_000]
    messages = [
        Retained(f"edge/sz-{n}/desired", bytes(range(256)) * (n // 256) + b"x" * (n % 256)) for n in sizes
    ]
    messages.append(Retained("edge/gerät-ü/desired", b"{}"))
    assert publish_retained(endpoint(broker), messages) == PublishOutcome(len(messages))
    for message in messages:
        device = message.topic.split("/")[1]
        assert retained(broker, device) == ({message.topic: message.payload} if message.payload else {})

    (tmp_path / "passwd").write_text("")
    locked = mosquitto_factory(password_file=tmp_path / "passwd")
    refused = publish_retained(endpoint(locked), messages[:1])
    assert refused.acknowledged == 0
    assert refused.error == (
        f"the MQTT broker at {endpoint(locked).url} refused the connection: not authorized"
    )
