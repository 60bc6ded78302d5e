"""The ingester's batching and writing, without a broker: messages handed to it as paho would.

The store is a real SQLite file; only the MQTT side is skipped (``flush`` never touches it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import MetaData, Table
from sqlalchemy.exc import OperationalError

from cloud.fleet.device_state import device_states
from cloud.fleet.ingest import Ingestor
from cloud.fleet.sql import aware
from cloud.store.db import Database, open_database
from cloud.store.devices import Device
from cloud.store.fleet import OnlineRecord, ReportedRecord
from edgemqtt.endpoint import Endpoint
from modules.contract import Heartbeat, OnlineStatus, ReportedState

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = open_database(f"sqlite:///{tmp_path / 'edge.db'}")
    with database.transaction() as s:
        s.add_all(Device(id=d, profile="cpu", password_hash="unused") for d in ("cam-1", "cam-2"))
    yield database
    database.dispose()


@pytest.fixture
def ingest(db: Database) -> Ingestor:
    return Ingestor(db, Endpoint.parse("mqtt://127.0.0.1:1883"))


def deliver(ingest: Ingestor, topic: str, payload: bytes) -> None:
    """Hand ``payload`` to the ingester the way its session's messages do."""
    ingest.accept(topic, payload)


def report(device: str, status: str, at: datetime, generation: int = 1) -> bytes:
    state = ReportedState(
        device_id=device,
        generation_applied=generation,
        deployment_status=status,
        agent_version="1.0",
        reported_at=at,
    )
    return state.model_dump_json().encode()


def online(up: bool, at: datetime) -> bytes:
    return OnlineStatus(online=up, ts=at).model_dump_json().encode()


def stored(db: Database) -> tuple[dict[str, str], dict[str, bool]]:
    with db.transaction() as s:
        return (
            {r.device_id: r.deployment_status for r in s.query(ReportedRecord)},
            {r.device_id: r.online for r in s.query(OnlineRecord)},
        )


def test_an_older_report_or_online_status_never_overwrites_a_newer_one(
    db: Database, ingest: Ingestor
) -> None:
    # Another cloud worker wrote the newer state first; this one's late, older messages lose.
    deliver(ingest, "edge/cam-1/reported", report("cam-1", "healthy", T0 + timedelta(seconds=5), 2))
    deliver(ingest, "edge/cam-1/online", online(False, T0 + timedelta(seconds=5)))
    assert ingest.flush() == 2
    deliver(ingest, "edge/cam-1/reported", report("cam-1", "applying", T0, 2))
    deliver(ingest, "edge/cam-1/online", online(True, T0))
    ingest.flush()
    assert stored(db) == ({"cam-1": "healthy"}, {"cam-1": False})
    # A newer one still replaces it, even when its timestamp is written in another timezone.
    later = (T0 + timedelta(seconds=6)).astimezone(timezone(timedelta(hours=-5)))
    deliver(ingest, "edge/cam-1/reported", report("cam-1", "failed", later, 3))
    deliver(ingest, "edge/cam-1/online", online(True, later))
    ingest.flush()
    assert stored(db) == ({"cam-1": "failed"}, {"cam-1": True})


def test_what_waits_is_the_newest_message_per_topic(db: Database, ingest: Ingestor) -> None:
    for i in range(500):  # a store too slow to keep up: messages keep coming between flushes
        deliver(ingest, "edge/cam-1/reported", report("cam-1", "applying", T0 + timedelta(seconds=i), i))
        deliver(ingest, "edge/cam-1/online", online(i % 2 == 0, T0 + timedelta(seconds=i)))
    assert ingest.backlog == 2
    assert ingest.flush() == 1000
    assert (ingest.stats.received, ingest.stats.written, ingest.stats.invalid) == (1000, 1000, 0)
    with db.transaction() as s:
        row = s.get(ReportedRecord, "cam-1")
        assert row is not None and row.generation_applied == 499
    assert stored(db)[1] == {"cam-1": False}


def test_a_failed_write_keeps_the_batch_behind_newer_messages(
    db: Database, ingest: Ingestor, caplog: pytest.LogCaptureFixture
) -> None:
    online_table = Table(OnlineRecord.__tablename__, MetaData(), autoload_with=db.engine)
    online_table.drop(db.engine)  # the store refuses the write
    deliver(ingest, "edge/cam-1/online", online(True, T0))
    deliver(ingest, "edge/cam-2/online", online(True, T0))
    deliver(ingest, "edge/cam-2/reported", report("cam-2", "healthy", T0))
    deliver(ingest, "edge/cam-2/reported", b"{not json")  # rejected, not retried
    assert ingest.flush() == 0
    assert "writing 2 report(s) to the store failed (kept for the next attempt)" in caplog.text
    assert (ingest.stats.received, ingest.stats.written, ingest.stats.invalid) == (2, 0, 2)
    assert ingest.backlog == 2
    deliver(ingest, "edge/cam-1/online", online(False, T0 + timedelta(seconds=1)))  # newer: kept
    online_table.create(db.engine)
    assert ingest.flush() == 3
    assert (ingest.stats.received, ingest.stats.written, ingest.stats.invalid) == (5, 3, 2)
    assert ingest.backlog == 0
    assert stored(db) == ({}, {"cam-1": False, "cam-2": True})


def session_online(up: bool, session: int, written_at: datetime, instance: str = "a") -> bytes:
    return (
        OnlineStatus(online=up, ts=written_at, session=session, instance=instance).model_dump_json().encode()
    )


@pytest.mark.parametrize("same_batch", [True, False])
def test_a_will_armed_before_the_birth_still_takes_the_device_offline(
    db: Database, ingest: Ingestor, same_batch: bool
) -> None:
    # The will's ts is taken at connect time, before the birth's: the session orders them.
    deliver(ingest, "edge/cam-1/online", session_online(True, 100, T0 + timedelta(seconds=1)))
    if not same_batch:
        ingest.flush()
    deliver(ingest, "edge/cam-1/online", session_online(False, 100, T0))
    ingest.flush()
    assert stored(db)[1] == {"cam-1": False}


@pytest.mark.parametrize("same_batch", [True, False])
def test_the_will_of_a_killed_agent_does_not_take_its_successor_offline(
    db: Database, ingest: Ingestor, same_batch: bool
) -> None:
    # Agent a was SIGKILLed and restarted as b; the broker publishes a's will after b's birth.
    deliver(ingest, "edge/cam-1/online", session_online(True, 100, T0, "a"))
    deliver(ingest, "edge/cam-1/online", session_online(True, 101, T0 + timedelta(seconds=2), "b"))
    if not same_batch:
        ingest.flush()
    deliver(ingest, "edge/cam-1/online", session_online(False, 100, T0 + timedelta(seconds=9), "a"))
    ingest.flush()
    assert stored(db)[1] == {"cam-1": True}
    with db.transaction() as s:
        row = s.get(OnlineRecord, "cam-1")
        assert row is not None and (row.session, row.instance) == (101, "b")


async def test_flush_now_waits_for_a_write_in_progress_and_sees_it_fail(
    ingest: Ingestor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A consumer acknowledges what it received once ``flush_now`` says True: never while the
    periodic flush that took those messages is still writing them, or after that write failed."""
    release, writing = threading.Event(), threading.Event()
    real = ingest._write_batch
    calls = 0

    def slow_then_failing(batch):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        if calls == 1:
            writing.set()
            release.wait(10)
            ingest.db.dispose()  # what a store that went away looks like to the write
            monkeypatch.setattr(ingest.db, "transaction", _refuse)
        return real(batch)

    def _refuse():  # type: ignore[no-untyped-def]
        raise OperationalError("write", {}, Exception("database is locked"))

    monkeypatch.setattr(ingest, "_write_batch", slow_then_failing)
    deliver(ingest, "edge/cam-1/reported", report("cam-1", "healthy", T0))
    periodic = asyncio.create_task(ingest._flush_async())
    await asyncio.to_thread(writing.wait, 10)
    acked = asyncio.create_task(ingest.flush_now())
    await asyncio.sleep(0.05)
    assert not acked.done()  # it waits for the write that holds its message
    release.set()
    await periodic
    assert await acked is False  # that write (and its retry) failed: nothing may be acknowledged
    assert ingest.backlog == 1  # the report waits for the next flush


def heartbeat(device: str, at: datetime, report_at: datetime) -> bytes:
    return (
        Heartbeat(device_id=device, report_at=report_at, heartbeat_s=60, reported_at=at)
        .model_dump_json()
        .encode()
    )


def test_a_heartbeat_keeps_the_device_fresh_and_its_full_report(
    db: Database, ingest: Ingestor, caplog: pytest.LogCaptureFixture
) -> None:
    full = report("cam-1", "healthy", T0)
    deliver(ingest, "edge/cam-1/reported", full)
    ingest.flush()
    later = T0 + timedelta(minutes=5)
    deliver(ingest, "edge/cam-1/heartbeat", heartbeat("cam-1", later, T0))
    deliver(ingest, "edge/cam-2/heartbeat", heartbeat("cam-2", later, T0))  # no full report stored
    deliver(ingest, "edge/cam-1/heartbeat", b'{"device_id": "cam-1"}')  # replaces the good one
    with caplog.at_level("INFO"):
        assert ingest.flush() == 1 and ingest.stats.invalid == 2  # both count as their successor
    assert "cam-2, whose full report the store does not hold" in caplog.text
    deliver(ingest, "edge/cam-1/heartbeat", heartbeat("cam-1", later, T0))
    ingest.flush()
    with db.transaction() as s:
        (row,) = s.query(ReportedRecord).all()
        assert (row.device_id, row.payload) == ("cam-1", full.decode())
        assert aware(row.reported_at) == later
        states = device_states(s, ["cam-1", "cam-2"], later + timedelta(minutes=2))
    assert states["cam-1"].presence == "online" and states["cam-1"].deployment_status == "healthy"
    assert states["cam-1"].reported_at == T0, "the full report's own time stands"
    assert states["cam-2"].presence == "never seen"
    # An older heartbeat (another worker's, late) moves nothing back; a newer full report still wins.
    deliver(ingest, "edge/cam-1/heartbeat", heartbeat("cam-1", T0 + timedelta(minutes=1), T0))
    ingest.flush()
    deliver(ingest, "edge/cam-1/reported", report("cam-1", "failed", later + timedelta(seconds=1)))
    ingest.flush()
    with db.transaction() as s:
        (row,) = s.query(ReportedRecord).all()
        assert (row.deployment_status, aware(row.reported_at)) == ("failed", later + timedelta(seconds=1))


def test_a_heartbeat_standing_by_a_report_the_store_lacks_is_logged(
    db: Database, ingest: Ingestor, caplog: pytest.LogCaptureFixture
) -> None:
    deliver(ingest, "edge/cam-1/reported", report("cam-1", "applying", T0))
    ingest.flush()
    newer = T0 + timedelta(minutes=1)
    deliver(ingest, "edge/cam-1/heartbeat", heartbeat("cam-1", newer + timedelta(minutes=1), newer))
    with caplog.at_level("INFO"):
        ingest.flush()
    assert "the store holds an older one" in caplog.text
    with db.transaction() as s:
        state = device_states(s, ["cam-1"], newer + timedelta(minutes=2))["cam-1"]
    assert state.presence == "online" and state.deployment_status == "applying"
