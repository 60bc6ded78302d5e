"""The fleet simulator against a real Mosquitto, with plain paho as the cloud that signs and publishes.

Every wait is for an event (reports seen by the cloud), with a generous timeout; nothing asserts on
how fast the fleet converges.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.observed import config_hash
from agent.runtime.simulated import SimulatedRuntime, SimulationSettings
from cloud import broker as broker_files
from cloud.config import resolve_settings
from harness.simulate import FleetOptions, SimDevice, SimulatedFleet, assign_profiles, device_ids
from harness.simulate_command import provision
from modules.contract import DesiredModule, DesiredState, HealthCheck, utcnow
from modules.signing import generate_keypair, load_private_key, load_public_key, sign_desired
from tests.services import REPO_ROOT, MosquittoBroker, MosquittoFactory

pytestmark = pytest.mark.integration

WAIT_S = 180.0
FAST = SimulationSettings(pull_s=(0.05, 0.3), start_s=(0.0, 0.0), ready_s=(0.1, 0.5))
PRIVATE_PEM, PUBLIC_PEM = generate_keypair()
PRIVATE = load_private_key(PRIVATE_PEM)


class Cloud:
    """Publishes signed desired states (retained) and keeps the newest report of every device."""

    def __init__(self, broker: MosquittoBroker, username: str | None = None, password: str | None = None):
        self.reports: dict[str, dict[str, Any]] = {}
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id="sim-test-cloud", protocol=MQTTProtocolVersion.MQTTv311
        )
        self.client.max_inflight_messages_set(500)
        self.client.max_queued_messages_set(0)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, *a: c.subscribe("edge/+/reported", qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            self.reports[message.topic.split("/")[1]] = json.loads(message.payload)
            self._changed.notify_all()

    async def ready(self) -> None:
        assert await asyncio.to_thread(self._subscribed.wait, 30), "the cloud could not subscribe"

    async def publish_desired(self, devices: list[SimDevice], generation: int, image: str, **kw: Any) -> None:
        await self.ready()
        infos = [
            self.client.publish(f"edge/{d.device_id}/desired", desired(d, generation, image, **kw), 1, True)
            for d in devices
        ]
        for info in infos:
            await asyncio.to_thread(info.wait_for_publish, 30)
            assert info.is_published()

    async def wait(
        self, check: Callable[[dict[str, dict[str, Any]]], bool], what: str
    ) -> dict[str, dict[str, Any]]:
        def wait() -> bool:
            with self._changed:
                return self._changed.wait_for(lambda: check(self.reports), WAIT_S)

        if not await asyncio.to_thread(wait):
            seen = [(r["deployment_status"], r["generation_applied"]) for r in self.reports.values()]
            pytest.fail(f"gave up waiting for {what}; {len(seen)} reports, e.g. {seen[:5]}")
        with self._changed:
            return dict(self.reports)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def module(image: str) -> DesiredModule:
    return DesiredModule(image=image, health=HealthCheck(interval_s=1.0))


def desired(device: SimDevice, generation: int, image: str, deadline_s: float = 60) -> bytes:
    now = utcnow()
    state = DesiredState(
        device_id=device.device_id,
        generation=generation,
        issued_at=now,
        expires_at=now + timedelta(hours=1),
        modules={"digits": module(image)},
        health_deadline_s=deadline_s,
    )
    return sign_desired(state, PRIVATE).model_dump_json().encode()


def fleet_of(
    broker: MosquittoBroker, devices: list[SimDevice], settings: SimulationSettings = FAST
) -> SimulatedFleet:
    options = FleetOptions(
        broker_url=f"mqtt://{broker.host}:{broker.port}", connect_rate=400, settings=settings, heartbeat_s=300
    )
    return SimulatedFleet(devices, load_public_key(PUBLIC_PEM), options)


@pytest.fixture
async def running() -> AsyncIterator[Callable[[SimulatedFleet], None]]:
    fleets: list[tuple[SimulatedFleet, asyncio.Task[Any]]] = []

    def start(fleet: SimulatedFleet) -> None:
        fleets.append((fleet, asyncio.create_task(fleet.run())))

    yield start
    for fleet, task in fleets:
        fleet.stop()
        await asyncio.wait_for(task, 120)


def all_at(
    devices: list[SimDevice], status: str, generation: int
) -> Callable[[dict[str, dict[str, Any]]], bool]:
    def check(reports: dict[str, dict[str, Any]]) -> bool:
        return all(
            (r := reports.get(d.device_id)) is not None
            and (r["deployment_status"], r["generation_applied"]) == (status, generation)
            for d in devices
        )

    return check


async def test_200_simulated_devices_converge_to_healthy(mosquitto: MosquittoBroker, running: Any) -> None:
    ids = device_ids(200, "conv-")
    profiles = assign_profiles(200, {"cpu": 80, "cuda": 15, "openvino-myriad": 5})
    devices = [SimDevice(d, p) for d, p in zip(ids, profiles, strict=True)]
    cloud = Cloud(mosquitto)
    try:
        await cloud.publish_desired(devices, 1, "registry.local/digits:1")
        fleet = fleet_of(mosquitto, devices)
        running(fleet)
        reports = await cloud.wait(all_at(devices, "healthy", 1), "200 healthy reports of generation 1")
        snapshot = fleet.snapshot()
        assert (snapshot.connected, snapshot.statuses["healthy"], snapshot.generations[1]) == (200, 200, 200)
        providers = {
            d.profile: reports[d.device_id]["modules"]["digits"]["execution_provider"] for d in devices
        }
        assert providers == {
            "cpu": "CPUExecutionProvider",
            "cuda": "CUDAExecutionProvider",
            "openvino-myriad": "openvino:MYRIAD",
        }
        cuda = next(d for d in devices if d.profile == "cuda")
        assert [a["kind"] for a in reports[cuda.device_id]["accelerators"]] == ["nvidia-gpu"]

        await cloud.publish_desired(devices, 2, "registry.local/digits:2")
        await cloud.wait(all_at(devices, "healthy", 2), "200 healthy reports of generation 2")
    finally:
        cloud.close()


async def test_broken_configurations_fail_or_roll_back_exactly_where_drawn(
    mosquitto: MosquittoBroker, running: Any
) -> None:
    devices = [SimDevice(d) for d in device_ids(60, "flaky-")]
    settings = SimulationSettings(
        pull_s=(0.05, 0.2), start_s=(0.0, 0.0), ready_s=(0.1, 0.3), failure_rate=0.3
    )
    cloud = Cloud(mosquitto)

    def broken(device: SimDevice, image: str) -> bool:
        rt = SimulatedRuntime(device.device_id, settings, seed=0)
        return rt.breakage("digits", config_hash(module(image))) is not None

    def settled(generation: int) -> Callable[[dict[str, dict[str, Any]]], bool]:
        def check(reports: dict[str, dict[str, Any]]) -> bool:
            return all(
                (r := reports.get(d.device_id)) is not None
                and r["generation_received"] == generation
                and r["deployment_status"] in ("healthy", "failed", "rolled_back")
                for d in devices
            )

        return check

    try:
        await cloud.publish_desired(devices, 1, "registry.local/flaky:1", deadline_s=4)
        running(fleet_of(mosquitto, devices, settings))
        first = await cloud.wait(settled(1), "every device to settle generation 1")
        expected_1 = {
            d.device_id: "failed" if broken(d, "registry.local/flaky:1") else "healthy" for d in devices
        }
        assert {d: first[d]["deployment_status"] for d in expected_1} == expected_1
        assert 0 < list(expected_1.values()).count("failed") < len(devices)

        await cloud.publish_desired(devices, 2, "registry.local/flaky:2", deadline_s=4)
        second = await cloud.wait(settled(2), "every device to settle generation 2")
        for d in devices:
            report = second[d.device_id]
            if broken(d, "registry.local/flaky:2"):
                # back to generation 1 when it had worked; nothing to go back to otherwise
                want = "rolled_back" if expected_1[d.device_id] == "healthy" else "failed"
                assert report["deployment_status"] == want, (d.device_id, report["reason"])
                assert "not healthy within 4 s" in report["reason"]
            else:
                assert (report["deployment_status"], report["generation_applied"]) == ("healthy", 2)
        assert any(r["deployment_status"] == "rolled_back" for r in second.values())
    finally:
        cloud.close()


async def test_provisioned_devices_connect_with_their_own_credentials_and_acls(
    mosquitto_factory: MosquittoFactory, tmp_path: Path, running: Any
) -> None:
    settings = resolve_settings(str(tmp_path / "data"), None)
    plan = [
        (d, p)
        for d, p in zip(device_ids(20, "prov-"), assign_profiles(20, {"cpu": 1, "cuda": 1}), strict=True)
    ]
    credentials = provision(settings, plan)
    paths = broker_files.BrokerPaths.of(settings.data_dir)
    broker = mosquitto_factory(password_file=paths.password_file, acl_file=paths.acl_file)
    user, password = broker_files.cloud_credentials(paths)
    devices = [SimDevice(d, c["profile"], username=d, password=c["password"]) for d, c in credentials.items()]
    impostor = SimDevice("prov-99999", "cpu", username="prov-99999", password="not-provisioned")
    cloud = Cloud(broker, user, password)
    try:
        await cloud.publish_desired(devices, 1, "registry.local/digits:1")
        fleet = fleet_of(broker, [*devices, impostor])
        running(fleet)
        await cloud.wait(all_at(devices, "healthy", 1), "20 provisioned devices to report healthy")
        assert fleet.snapshot().connected == 20  # the impostor is refused
        assert "prov-99999" not in cloud.reports
        assert {c["profile"] for c in credentials.values()} == {"cpu", "cuda"}

        again = provision(settings, plan[:2])  # re-keys: the old passwords stop working after a reload
        assert again[plan[0][0]]["password"] != credentials[plan[0][0]]["password"]
    finally:
        cloud.close()


@pytest.mark.parametrize("processes", [1, 2])
def test_edgectl_simulate_runs_and_summarises(
    mosquitto: MosquittoBroker, tmp_path: Path, processes: int
) -> None:
    command = [
        sys.executable,
        "-m",
        "cloud.cli",
        "simulate",
        "--data-dir",
        str(tmp_path / "data"),
        "--devices",
        "30",
        "--prefix",  # ids of its own: other tests leave retained desired states for sim-* on the broker
        f"summary{processes}-",
        "--profile-mix",
        "cpu=2,openvino-myriad=1",
        "--broker",
        f"mqtt://{mosquitto.host}:{mosquitto.port}",
        "--duration",
        "4",
        "--progress",
        "1",
        "--processes",
        str(processes),
        "--json",
    ]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["devices"], summary["started"]) == (30, 30)
    assert summary["statuses"]["waiting"] + summary["statuses"]["none"] == 30  # no desired state was sent
    assert summary["errors"] == {}
    assert "simulating 30 devices (anonymous)" in done.stderr
    assert "connected" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--devices", "0"], "--devices 0: expected 1..100000"),
        (["--devices", "5", "--profile-mix", "cpu=1,quantum=2"], "no device profile 'quantum'"),
        (
            ["--devices", "5", "--failure-rate", "2"],
            "--failure-rate '2': expected a probability between 0 and 1",
        ),
        (["--devices", "5", "--ready-s", "3-1"], "--ready-s '3-1': expected 0 <= LOW <= HIGH"),
        (
            ["--devices", "5", "--credentials", "/nonexistent/creds.json"],
            "--credentials /nonexistent/creds.json",
        ),
    ],
)
def test_edgectl_simulate_bad_input_exits_2(tmp_path: Path, args: list[str], message: str) -> None:
    command = [sys.executable, "-m", "cloud.cli", "simulate", "--data-dir", str(tmp_path), *args]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
