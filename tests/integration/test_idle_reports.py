"""An idle agent on a real Mosquitto: heartbeats, not full reports, and the cloud keeps it fresh.

The agent runs in-process (real ``Link``, process runtime) with a 1 s heartbeat; the cloud side is
a paho subscriber (``CloudSide``) and a real ``Ingestor`` writing a SQLite store. Every wait is for
a condition with a generous limit; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.runtime.process import ProcessRuntime
from agent.sysmetrics import SystemSampler
from cloud.fleet.device_state import device_states
from cloud.fleet.ingest import Ingestor
from cloud.fleet.sql import aware
from cloud.store.db import Database, open_database
from cloud.store.devices import Device
from cloud.store.fleet import ReportedRecord
from edgemqtt.endpoint import Endpoint
from modules.contract import SystemMetrics, utcnow
from tests.integration.agent_rig import CloudSide, Keys, agent_config, desired_state, running_agent
from tests.services import MosquittoBroker

pytestmark = pytest.mark.integration

DEVICE = f"idle-{uuid.uuid4().hex[:8]}"  # the session's broker is shared: a fresh id
WAIT_S = 30.0
HEARTBEAT_S = 1.0


class SteadySampler(SystemSampler):
    """The host's metrics once, then the same: other work on a shared machine is not news here."""

    def sample(self) -> SystemMetrics:
        if not hasattr(self, "first"):
            self.first = super().sample()
        return self.first


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{tmp_path / 'edge.db'}")
    with database.transaction() as s:
        s.add(Device(id=DEVICE, profile="cpu", password_hash="unused"))
    yield database
    database.dispose()


async def wait_for(check: object, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not check():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"not within {WAIT_S:g} s: {what}")
        await asyncio.sleep(0.05)


def stored(db: Database) -> ReportedRecord | None:
    """This device's stored report, if any (the session's broker also holds other tests' retained
    reports, which the ingester writes too)."""
    with db.transaction() as s:
        row = s.get(ReportedRecord, DEVICE)
        if row is not None:
            s.expunge(row)
        return row


async def test_an_idle_agent_sends_heartbeats_the_cloud_keeps_it_fresh_and_news_goes_out_at_once(
    tmp_path: Path, mosquitto: MosquittoBroker, db: Database
) -> None:
    keys = Keys(tmp_path / "keys")
    config = agent_config(tmp_path, DEVICE, mosquitto.port, keys, runtime="process", heartbeat_s=HEARTBEAT_S)
    cloud = CloudSide(mosquitto.port, DEVICE)
    cloud.clear_retained()
    runtime = ProcessRuntime(config.state_dir, tmp_path / "images", stop_timeout_s=5)
    endpoint = Endpoint.parse(f"mqtt://{mosquitto.host}:{mosquitto.port}")
    try:
        async with (
            Ingestor(db, endpoint, flush_interval_s=0.05) as ingest,
            running_agent(config, runtime, keys, sampler=SteadySampler(config.state_dir)),
        ):
            await cloud.report(lambda r: r.reason == "no desired state received yet", "idle")
            await wait_for(lambda: len(cloud.heartbeats) >= 5, "5 heartbeats")
            # Idle: after the start-up reports (one more once the session is up), only heartbeats
            # standing by the last full report, which the broker keeps retained.
            first = cloud.reports[-1]
            assert all(r.reported_at < cloud.heartbeats[0].reported_at for r in cloud.reports)
            assert {(b.report_at, b.heartbeat_s, b.generation_applied) for b in cloud.heartbeats} == {
                (first.reported_at, HEARTBEAT_S, 0)
            }

            # The cloud holds the full report, refreshed by the heartbeats: fresh well past 3 beats.
            last_beat = cloud.heartbeats[-1].reported_at
            await wait_for(
                lambda: (got := stored(db)) is not None and aware(got.reported_at) >= last_beat,
                "a heartbeat in the store",
            )
            row = stored(db)
            assert row is not None and row.payload == first.model_dump_json()
            with db.transaction() as s:
                state = device_states(s, [DEVICE], utcnow())[DEVICE]
            assert (utcnow() - first.reported_at).total_seconds() > 3 * HEARTBEAT_S
            assert state.presence == "online", state
            assert (
                state.reported_at == first.reported_at and state.deployment_status == first.deployment_status
            )
            assert ingest.stats.invalid == 0

            # News (a desired state whose module cannot start) is a full report, not a heartbeat.
            mark = cloud.mark()
            cloud.publish_desired(
                desired_state(
                    DEVICE,
                    1,
                    {"web": {"image": "localhost:5000/edge/absent:1", "ports": [{"container": 5001}]}},
                    key=keys.private,
                    rollback="none",
                )
            )
            news = await cloud.next_report(
                lambda r: "web" in r.modules and r.modules["web"].runtime_status == "failed",
                "with the failed module",
                since=mark,
            )
            await wait_for(
                lambda: (got := stored(db)) is not None and '"failed"' in got.payload, "the news in the store"
            )
            row = stored(db)
            assert row is not None and row.generation_applied == news.generation_applied
    finally:
        cloud.clear_retained()
        cloud.close()
