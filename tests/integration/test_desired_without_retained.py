"""Desired state reaches devices whatever the broker keeps: the announce-and-answer protocol.

A real cloud (``Fleet.apply`` signs and publishes retained desired states, ``Ingestor`` ingests
and answers) and real agents (the simulator: admission, planner, state, link) on a real Mosquitto.
The retained desired states are cleared before the agents start, as a cluster node that held them
and died would leave things: the agents still converge, because each announces the generation it
has when its session starts and the cloud answers those that are behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from agent.runtime.simulated import SimulationSettings
from cloud.fleet.ingest import Ingestor
from cloud.fleet.service import Fleet
from cloud.keys import load_or_create_signing_key
from cloud.store.db import open_database
from cloud.store.devices import Device, DeviceTag
from cloud.store.fleet import ReportedRecord
from edgemqtt import topics
from edgemqtt.bulk import Retained, publish_retained
from edgemqtt.endpoint import Endpoint
from edgemqtt.session import Session, SessionOptions
from harness.simulate import FleetOptions, SimDevice, SimulatedFleet, device_ids
from modules.contract import DeploymentManifest
from modules.profiles import load_profiles
from tests.services import MosquittoFactory

pytestmark = pytest.mark.integration

DEVICES = 30
WAIT_S = 120.0
ABSENCE_S = 1.0
FAST = SimulationSettings(pull_s=(0.05, 0.2), start_s=(0.0, 0.0), ready_s=(0.1, 0.3))
MANIFEST = DeploymentManifest.model_validate(
    {
        "name": "noretain",
        "target": {"tags": {"fleet": "noretain"}},
        "modules": {"digits": {"images": {"cpu": "registry.local/digits:1"}}},
    }
)


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[Fleet]:
    db = open_database(f"sqlite:///{tmp_path / 'edge.db'}")
    ids = device_ids(DEVICES, "noretain-")
    with db.transaction() as s:
        s.add_all(Device(id=d, profile="cpu", password_hash="-") for d in ids)
        s.add_all(DeviceTag(device_id=d, key="fleet", value="noretain") for d in ids)
    fleet = Fleet(db, load_or_create_signing_key(tmp_path), load_profiles())
    yield fleet
    fleet.close()


async def retained_desired(endpoint: Endpoint) -> int:
    """How many retained desired states a fresh subscriber gets (bounded absence check)."""
    session = Session(
        endpoint,
        client_id="retained-probe",
        subscriptions=[f"{topics.ROOT}/+/desired"],
        options=SessionOptions(),
    )
    session.start()
    count = 0
    try:
        await session.wait_up(WAIT_S)

        async def count_all() -> None:
            nonlocal count
            async for message in session.messages():
                count += bool(message.payload)

        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(count_all(), ABSENCE_S)
    finally:
        await session.close()
    return count


def healthy_at(cloud: Fleet, generation: int) -> int:
    with cloud.db.transaction() as s:
        rows = s.execute(select(ReportedRecord.generation_applied, ReportedRecord.deployment_status)).all()
    return sum(1 for g, status in rows if (g, status) == (generation, "healthy"))


async def test_devices_converge_when_the_broker_kept_no_retained_desired_state(
    cloud: Fleet, mosquitto_factory: MosquittoFactory, tmp_path: Path
) -> None:
    broker = mosquitto_factory(persistence=False)
    endpoint = Endpoint.parse(f"mqtt://{broker.host}:{broker.port}")
    applied = await asyncio.to_thread(cloud.apply, MANIFEST, endpoint=endpoint)
    assert applied.publish.published == DEVICES
    ids = device_ids(DEVICES, "noretain-")
    cleared = await asyncio.to_thread(
        publish_retained, endpoint, [Retained(topics.desired(d), b"") for d in ids]
    )
    assert cleared.acknowledged == DEVICES
    assert await retained_desired(endpoint) == 0  # the broker keeps nothing for the devices now

    public_key = load_or_create_signing_key(tmp_path).public_key()
    options = FleetOptions(broker_url=endpoint.url, connect_rate=200, settings=FAST, heartbeat_s=300)
    sims = SimulatedFleet([SimDevice(d) for d in ids], public_key, options)
    async with Ingestor(cloud.db, endpoint, flush_interval_s=0.05) as ingest:
        task = asyncio.create_task(sims.run())
        try:
            deadline = asyncio.get_running_loop().time() + WAIT_S
            while await asyncio.to_thread(healthy_at, cloud, 1) < DEVICES:
                assert asyncio.get_running_loop().time() < deadline, "the devices did not converge"
                await asyncio.sleep(0.2)
        finally:
            sims.stop()
            await asyncio.wait_for(task, WAIT_S)
    # Every device was answered (a device may be answered twice: duplicates are harmless).
    assert ingest.stats.resent >= DEVICES
    # The answers were published retained: the broker holds the desired states again.
    assert await retained_desired(endpoint) == DEVICES
