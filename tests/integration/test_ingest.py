"""Reports and online messages into the store, and commands round-tripped, on a real Mosquitto.

Every wait is for a condition with a generous timeout; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from cloud.fleet.commands import CommandTimeout, DeviceOffline, run_command
from cloud.fleet.ingest import Ingestor
from cloud.store.db import Database, open_database
from cloud.store.devices import Device
from cloud.store.errors import NotFoundError
from cloud.store.fleet import OnlineRecord, ReportedRecord
from edgemqtt.endpoint import Endpoint
from modules.contract import CommandRequest, CommandResponse, ModuleStatus, OnlineStatus, ReportedState
from tests.integration.test_store_postgres import db_url, postgres  # noqa: F401 (fixtures)
from tests.services import MosquittoBroker, MosquittoFactory
from tests.unit.test_ingest_batch import deliver, online, report, stored

pytestmark = pytest.mark.integration

WAIT_S = 30.0


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{tmp_path / 'edge.db'}")
    with database.transaction() as s:
        s.add_all(Device(id=d, profile="cpu", password_hash="unused") for d in ("cam-1", "cam-2", "cam-3"))
    yield database
    database.dispose()


def endpoint(broker: MosquittoBroker) -> Endpoint:
    return Endpoint.parse(f"mqtt://{broker.host}:{broker.port}")


def client(broker: MosquittoBroker) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    c.connect(broker.host, broker.port)
    c.loop_start()
    return c


def publish(broker: MosquittoBroker, messages: list[tuple[str, bytes]]) -> None:
    c = client(broker)
    for info in [c.publish(topic, payload, qos=1, retain=True) for topic, payload in messages]:
        info.wait_for_publish(WAIT_S)
    c.disconnect()
    c.loop_stop()


async def until(check: Callable[[], bool]) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not check():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def reported(device: str, generation: int, status: str = "healthy", reason: str | None = None) -> bytes:
    return (
        ReportedState(
            device_id=device,
            generation_applied=generation,
            deployment_status=status,
            reason=reason,
            modules={"det": ModuleStatus(runtime_status="running")},
            agent_version="1.0",
        )
        .model_dump_json()
        .encode()
    )


async def test_reports_and_online_messages_are_stored(
    db: Database, mosquitto_factory: MosquittoFactory
) -> None:
    mosquitto = mosquitto_factory()  # its own broker: no retained messages from other tests
    since = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
    cleared = [("edge/cam-3/reported", b""), ("edge/cam-3/online", b"")]  # a removed device's clear
    messages = [
        ("edge/cam-1/reported", reported("cam-1", 1, "applying")),
        ("edge/cam-1/reported", reported("cam-1", 2, "failed", "det: exited with code 3")),  # newest wins
        ("edge/cam-2/reported", reported("cam-2", 5)),
        ("edge/cam-3/reported", reported("cam-2", 9)),  # names another device: ignored
        ("edge/cam-3/reported", b"{not json"),
        ("edge/cam-1/online", OnlineStatus(online=True, ts=since).model_dump_json().encode()),
        ("edge/cam-2/online", OnlineStatus(online=False, ts=since).model_dump_json().encode()),
    ]
    async with Ingestor(db, endpoint(mosquitto), flush_interval_s=0.05) as ingest:
        await asyncio.to_thread(publish, mosquitto, cleared + messages)
        assert await until(lambda: ingest.stats.received >= len(messages))
    assert (ingest.stats.received, ingest.stats.written, ingest.stats.invalid) == (7, 5, 2)
    with db.transaction() as s:
        rows = {r.device_id: r for r in s.query(ReportedRecord)}
        online = {
            r.device_id: (r.online, r.since.replace(tzinfo=timezone.utc)) for r in s.query(OnlineRecord)
        }
        assert {d: (r.generation_applied, r.deployment_status, r.reason) for d, r in rows.items()} == {
            "cam-1": (2, "failed", "det: exited with code 3"),
            "cam-2": (5, "healthy", None),
        }
        assert (
            ReportedState.model_validate_json(rows["cam-2"].payload).modules["det"].runtime_status
            == "running"
        )
    assert online == {"cam-1": (True, since), "cam-2": (False, since)}


class Responder:
    """A tiny device: answers ``logs`` and ``restart`` requests on ``edge/{d}/cmd/req/+``."""

    def __init__(self, broker: MosquittoBroker, device: str) -> None:
        self.device = device
        self.requests: list[CommandRequest] = []
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.connect(broker.host, broker.port)
        self.client.subscribe(f"edge/{device}/cmd/req/+", qos=1)
        self.client.loop_start()
        assert subscribed.wait(WAIT_S)

    def _on_message(self, c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        request = CommandRequest.model_validate_json(message.payload)
        self.requests.append(request)
        if request.command == "logs":
            lines = [f"{request.module} line {i}" for i in range(1, 501)][-request.tail :]
            response = CommandResponse(id=request.id, ok=True, output="\n".join(lines))
        else:
            response = CommandResponse(id=request.id, ok=False, error=f"no module {request.module!r}")
        c.publish(f"edge/{self.device}/cmd/res/{request.id}", response.model_dump_json(), qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_command_round_trip(db: Database, mosquitto: MosquittoBroker) -> None:
    responder = Responder(mosquitto, "cam-1")
    try:
        logs = run_command(db, endpoint(mosquitto), "cam-1", "logs", module="det", tail=3, timeout_s=WAIT_S)
        restart = run_command(db, endpoint(mosquitto), "cam-1", "restart", module="nope", timeout_s=WAIT_S)
    finally:
        responder.close()
    assert (logs.ok, logs.output) == (True, "det line 498\ndet line 499\ndet line 500")
    assert (restart.ok, restart.error) == (False, "no module 'nope'")
    assert [(r.command, r.module, r.tail) for r in responder.requests] == [
        ("logs", "det", 3),
        ("restart", "nope", 100),
    ]


def test_offline_device_is_refused_with_when(db: Database, mosquitto: MosquittoBroker) -> None:
    with db.transaction() as s:
        since = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
        s.add(OnlineRecord(device_id="cam-2", online=False, since=since, received_at=since))
    with pytest.raises(DeviceOffline) as err:
        run_command(db, endpoint(mosquitto), "cam-2", "restart", module="det")
    assert str(err.value) == "device cam-2 is offline since 2026-03-01T12:00:00Z; restart was not sent"


def test_silent_device_times_out_and_unknown_device_is_named(
    db: Database, mosquitto: MosquittoBroker
) -> None:
    with pytest.raises(CommandTimeout) as err:
        run_command(db, endpoint(mosquitto), "cam-3", "ping", timeout_s=0.5)
    assert str(err.value) == "device cam-3 did not answer ping within 0.5 s (it never reported being online)"
    with pytest.raises(NotFoundError, match="device 'cam-9' is not provisioned"):
        run_command(db, endpoint(mosquitto), "cam-9", "ping")


async def test_named_session_ingests_reports_sent_while_away(
    db: Database, mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory()
    async with Ingestor(db, endpoint(broker), session="cloud-test"):
        pass  # the broker now keeps the session and queues for it
    await asyncio.to_thread(publish, broker, [("edge/cam-3/reported", reported("cam-3", 4))])
    async with Ingestor(db, endpoint(broker), session="cloud-test", flush_interval_s=0.05) as ingest:
        assert await ingest.wait_received(1, WAIT_S)
    with db.transaction() as s:
        row = s.get(ReportedRecord, "cam-3")
        assert row is not None and row.generation_applied == 4


def test_an_older_report_never_overwrites_a_newer_one_on_postgresql(db_url: str) -> None:  # noqa: F811
    database = open_database(db_url)
    try:
        with database.transaction() as s:
            s.add(Device(id="cam-1", profile="cpu", password_hash="unused"))
        ingest = Ingestor(database, Endpoint.parse("mqtt://127.0.0.1:1883"))
        t0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
        deliver(ingest, "edge/cam-1/reported", report("cam-1", "healthy", t0 + timedelta(seconds=5)))
        deliver(ingest, "edge/cam-1/online", online(False, t0 + timedelta(seconds=5)))
        assert ingest.flush() == 2
        deliver(ingest, "edge/cam-1/reported", report("cam-1", "applying", t0))
        deliver(ingest, "edge/cam-1/online", online(True, t0))
        assert ingest.flush() == 2
        assert stored(database) == ({"cam-1": "healthy"}, {"cam-1": False})
        deliver(ingest, "edge/cam-1/reported", report("cam-1", "failed", t0 + timedelta(seconds=6)))
        ingest.flush()
        assert stored(database)[0] == {"cam-1": "failed"}
    finally:
        database.dispose()
