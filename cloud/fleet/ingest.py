"""Ingest device reports (``ReportedState``, ``Heartbeat``, ``OnlineStatus``) into the store, in batches.

The ingester runs one ``edgemqtt.Session`` on the event loop, subscribed to
``$share/cloud/edge/+/reported`` and ``$share/cloud/edge/+/heartbeat`` (several cloud processes
split the fleet's reports between them) and ``edge/+/online``. Receiving only keeps the newest raw
message per topic (so what waits is bounded by the fleet's size, however slow the store); every
``flush_interval_s`` the batch is taken on the loop, then parsed and written in a worker thread with
one ``executemany`` upsert per table inside one transaction. A batch whose write fails is put back
for the next flush. A stored row is replaced only by a newer one: reports by ``reported_at`` (one
device's reports may be split between cloud workers, and a late, older report must not undo a newer
one), online messages by ``online_ordering`` (the agent's MQTT session number, offline after online
within one session), never by wall-clock fields written at different moments: a SIGKILLed agent's
will is armed at connect time, before its birth message, yet must win over it.

A heartbeat (an idle agent's "nothing changed" between full reports) moves the stored report's
``reported_at``/``received_at`` forward, so the device stays fresh, and keeps its payload; it is
written after the batch's reports. One that stands by a full report the store does not hold (none,
or an older one) still refreshes what is stored and is logged: the retained report reaches a cloud
worker that subscribes again. A message that does not parse,
or whose device id differs from its topic's, is counted and logged, never written; an empty one
(a removed device's retained message being cleared) is skipped.

Desired state does not depend on the broker keeping retained messages: an agent's birth message
announces the generation it has, and the ingester answers a device that is behind with its
current signed desired state (published retained, QoS 1: it also restores the retained message
on a broker that lost it). Answering twice is harmless: the agent ignores a generation it has.

With a ``session`` name the ingester's MQTT session outlives it (``SESSION_EXPIRY_S``): reports
published while the cloud process is away are queued by the broker and ingested on its return.
While away, such a session stays in the shared subscription group, so the broker keeps queueing
its share of the fleet's reports for it; give a session name only to a worker that comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

from pydantic import ValidationError
from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import SQLAlchemyError

from cloud.fleet.sql import aware, binder, executemany, upsert
from cloud.store.db import Database
from cloud.store.fleet import DesiredRecord, OnlineRecord, ReportedRecord
from edgemqtt import topics
from edgemqtt.endpoint import BrokerUnavailable, Endpoint
from edgemqtt.session import Publication, PublishRefused, Session, SessionOptions
from modules.contract import Heartbeat, OnlineStatus, ReportedState, format_validation_error, utcnow

log = logging.getLogger(__name__)

REPORTED_SUBSCRIPTION = topics.shared(topics.ALL_REPORTED)
HEARTBEAT_SUBSCRIPTION = topics.shared(topics.ALL_HEARTBEATS)
ONLINE_SUBSCRIPTION = topics.ALL_ONLINE
FLUSH_INTERVAL_S = 0.1
SESSION_EXPIRY_S = 3600
SUBSCRIBE_TIMEOUT_S = 10.0
RECONNECT_MAX_S = 2
"""A lost connection is retried after 1 s, then at most this many seconds apart. Short: a cloud
worker is one client, not a fleet, and the fleet's retained reports wait for it on the broker's return."""
MAX_INFLIGHT = 1000
"""Answers to devices that are behind sent and not yet acknowledged."""


@dataclass
class IngestStats:
    """Counters since start: messages received, written, and rejected as malformed.

    A message is counted once its batch was written or rejected; one replaced by a newer message
    on its topic before that counts as its successor does.
    """

    received: int = 0
    written: int = 0
    invalid: int = 0
    resent: int = 0
    """Desired states sent again to devices that announced an older generation."""


@dataclass(frozen=True)
class _Pending:
    """The newest message on one topic not written yet, and how many messages it stands for."""

    payload: bytes
    received_at: datetime
    count: int
    ordering: int | None = None


def online_ordering(status: OnlineStatus) -> int:
    """Which ``edge/{d}/online`` message is newer: the higher number.

    Twice the session number, plus one when offline: a connection's will and farewell come after
    its birth, and every later connection's birth after both. Without a session number (older
    agents) the message's timestamp in microseconds stands in for it.
    """
    base = status.session if status.session is not None else int(_utc(status.ts).timestamp() * 1_000_000)
    return base * 2 + (0 if status.online else 1)


def _utc(dt: datetime) -> datetime:
    """``dt`` in UTC (a naive one is taken as UTC), so stored times compare in order on SQLite too."""
    return aware(dt).astimezone(timezone.utc)


def _online_ordering(topic: str, payload: bytes) -> int | None:
    """The ordering of an online message (None for reports and for what does not parse)."""
    if _topic_device(topic, "online") is None:
        return None
    try:
        return online_ordering(OnlineStatus.model_validate_json(payload))
    except ValidationError:
        return None


def _topic_device(topic: str, kind: str) -> str | None:
    parsed = topics.parse(topic)
    return parsed.device if parsed is not None and parsed.kind == kind else None


@dataclass
class _Outcome:
    """What writing one batch gave: counts, what to put back, and the devices owed their state."""

    written: int = 0
    invalid: int = 0
    failed: dict[str, _Pending] = field(default_factory=dict)
    behind: list[tuple[str, int, int | None, str]] = field(default_factory=list)
    """``(device, generation, announced, payload)`` of devices that announced an older generation."""


class Ingestor:
    """``async with Ingestor(db, endpoint) as ingest``: writes reports until the block ends."""

    def __init__(
        self,
        db: Database,
        endpoint: Endpoint,
        *,
        flush_interval_s: float = FLUSH_INTERVAL_S,
        session: str | None = None,
        session_expiry_s: int = SESSION_EXPIRY_S,
        shared: bool = True,
        protocol: str = "mqttv5",
        subscribe_qos: int = 1,
        subscribe_reports: bool = True,
    ) -> None:
        """``shared=False``: subscribe to every report without ``$share`` (one worker per fleet), for
        brokers without shared subscriptions such as RabbitMQ 3.10, which speaks only MQTT 3.1.1
        (``protocol="mqttv311"``; a persistent ``session`` needs MQTT 5) and keeps a QoS 1
        subscription's queue on one node (``subscribe_qos=0`` lets the ingester fail over: reports
        are retained, heartbeats keep coming). ``subscribe_reports=False``: reports come from elsewhere
        (``cloud.fleet.amqp_reports``, RabbitMQ's quorum queue), only online messages over MQTT."""
        self.db = db
        self.endpoint = endpoint
        self.session = session
        self.session_expiry_s = session_expiry_s
        self.flush_interval_s = flush_interval_s
        self.shared = shared
        self.protocol = protocol
        self.subscribe_qos = subscribe_qos
        self.subscribe_reports = subscribe_reports
        self._write_failed = False
        self.stats = IngestStats()
        self._pending: dict[str, _Pending] = {}
        self._mqtt: Session | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._flushed: asyncio.Condition | None = None
        self._flush_lock = asyncio.Lock()

    async def __aenter__(self) -> Ingestor:
        options = SessionOptions(
            protocol=self.protocol,
            subscribe_qos=self.subscribe_qos,
            reconnect_max_s=RECONNECT_MAX_S,
            session_expiry_s=self.session_expiry_s if self.session else 0,
            max_queued_messages=0,
            max_inflight=MAX_INFLIGHT,
        )
        mqtt = Session(
            self.endpoint,
            client_id=self.session or f"edgectl-ingest-{uuid.uuid4().hex[:12]}",
            subscriptions=[
                *(
                    (
                        [REPORTED_SUBSCRIPTION, HEARTBEAT_SUBSCRIPTION]
                        if self.shared
                        else [topics.ALL_REPORTED, topics.ALL_HEARTBEATS]
                    )
                    if self.subscribe_reports
                    else []
                ),
                ONLINE_SUBSCRIPTION,
            ],
            options=options,
        )
        mqtt.start()
        try:
            await mqtt.wait_up(SUBSCRIBE_TIMEOUT_S)
        except BrokerUnavailable:
            await mqtt.close()
            raise
        self._mqtt = mqtt
        self._flushed = asyncio.Condition()
        self._tasks = [
            asyncio.create_task(self._receive(mqtt), name="fleet-ingest-receive"),
            asyncio.create_task(self._run(), name="fleet-ingest"),
        ]
        for task in self._tasks:
            task.add_done_callback(log_crash)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._mqtt is not None:
            await self._mqtt.close()
        await self._flush_async(answer=False)

    @property
    def connected(self) -> bool:
        """Whether the MQTT session is up now (a lost one is re-established in the background)."""
        return self._mqtt is not None and self._mqtt.is_up

    async def _receive(self, mqtt: Session) -> None:
        async for message in mqtt.messages():
            self.accept(message.topic, message.payload)

    async def _run(self) -> None:
        assert self._flushed is not None
        while True:
            await asyncio.sleep(self.flush_interval_s)
            received = self.stats.received
            await self._flush_async()
            if self.stats.received != received:
                async with self._flushed:
                    self._flushed.notify_all()

    async def wait_received(self, count: int, timeout_s: float) -> bool:
        """Wait until ``count`` messages were received and flushed (written or rejected); False on timeout."""
        if self._flushed is None:
            raise RuntimeError("the ingester is not running: use 'async with Ingestor(...)'")
        flushed = self._flushed

        async def reached() -> None:
            async with flushed:
                await flushed.wait_for(lambda: self.stats.received >= count)

        try:
            await asyncio.wait_for(reached(), timeout_s)
        except asyncio.TimeoutError:  # not the builtin before Python 3.11
            return False
        return True

    def accept(self, topic: str, payload: bytes) -> None:
        """Queue one received message for the next flush; a newer one on the same topic replaces it."""
        if not payload:
            return  # a cleared retained message (a removed device): nothing to ingest
        ordering = _online_ordering(topic, payload)
        older = self._pending.get(topic)
        count = 1 if older is None else older.count + 1
        kept = older.ordering if older is not None else None
        if older is not None and kept is not None and ordering is not None and kept > ordering:
            # an online message of an older session arrived late (a will after a restart)
            self._pending[topic] = _Pending(older.payload, older.received_at, count, kept)
        else:
            self._pending[topic] = _Pending(payload, utcnow(), count, ordering)

    # ---- writing -----------------------------------------------------------------------------

    @property
    def backlog(self) -> int:
        """How many topics hold a message not written yet (at most two per device)."""
        return len(self._pending)

    @property
    def waiting(self) -> int:
        """How many received messages wait for the next flush (several on one topic count apart)."""
        return sum(entry.count for entry in self._pending.values())

    def flush(self) -> int:
        """Write what arrived since the last flush, in this thread; returns how many messages were written.

        For callers without an event loop; devices found behind are not answered here.
        """
        batch, self._pending = self._pending, {}
        return self._settle(batch, self._write_batch(batch))

    async def flush_now(self) -> bool:
        """Write what arrived so far now; False when the store refused it (it waits for the next flush).

        For consumers that acknowledge their source only once messages are in the store.
        """
        received = self.stats.received
        self._write_failed = False
        await self._flush_async()
        if self._flushed is not None and self.stats.received != received:
            async with self._flushed:
                self._flushed.notify_all()
        return not self._write_failed

    async def _flush_async(self, *, answer: bool = True) -> int:
        """Take the batch on the loop, write it in a worker thread, answer devices that are behind."""
        # One flush at a time: ``flush_now`` must not find the batch gone while another flush is
        # still writing it (its caller acknowledges what it received once this returns).
        async with self._flush_lock:
            batch, self._pending = self._pending, {}
            if not batch:
                return 0
            outcome = await asyncio.to_thread(self._write_batch, batch)
            written = self._settle(batch, outcome)
        if answer and outcome.behind and self._mqtt is not None:
            self._answer(self._mqtt, outcome.behind)
        return written

    def _settle(self, batch: dict[str, _Pending], outcome: _Outcome) -> int:
        """Count a written batch and put back what failed (behind anything newer that arrived meanwhile)."""
        self.stats.received += outcome.invalid + outcome.written
        self.stats.invalid += outcome.invalid
        self.stats.written += outcome.written
        self._write_failed = self._write_failed or bool(outcome.failed)
        for topic, entry in outcome.failed.items():
            newer = self._pending.get(topic)
            self._pending[topic] = (
                entry
                if newer is None
                else _Pending(newer.payload, newer.received_at, newer.count + entry.count, newer.ordering)
            )
        return outcome.written

    def _answer(self, mqtt: Session, behind: list[tuple[str, int, int | None, str]]) -> None:
        """Publish each device's current desired state again (retained, QoS 1)."""
        for device, generation, announced, payload in behind:
            log.info(
                "device %s announced generation %s, behind %d: sending its desired state again",
                device,
                announced,
                generation,
            )
            future = mqtt.publish(Publication(topics.desired(device), payload.encode(), qos=1, retain=True))
            future.add_done_callback(_log_refused_answer)
        self.stats.resent += len(behind)

    def _write_batch(self, batch: dict[str, _Pending]) -> _Outcome:
        """Parse and write one batch (a worker thread may run this: it touches no shared state)."""
        outcome = _Outcome()
        reported: dict[str, dict[str, Any]] = {}
        online: dict[str, dict[str, Any]] = {}
        beats: dict[str, dict[str, Any]] = {}
        valid: dict[str, _Pending] = {}
        for topic, entry in batch.items():
            row = self._parse(topic, entry.payload, entry.received_at)
            if row is None:
                outcome.invalid += entry.count
                continue
            valid[topic] = entry
            kind = online if "online" in row else beats if "report_at" in row else reported
            kind[row["device_id"]] = row
        if not valid:
            return outcome
        try:
            self._write(reported, online)
            self._write_heartbeats(beats)
            outcome.behind = self._behind(online.values())
        except (SQLAlchemyError, OSError) as e:
            outcome.failed = valid
            log.error(
                "writing %d report(s) to the store failed (kept for the next attempt): %s",
                len(valid),
                str(e).splitlines()[0] if str(e) else type(e).__name__,
            )
            return outcome
        outcome.written = sum(entry.count for entry in valid.values())
        return outcome

    def _behind(self, online: Any) -> list[tuple[str, int, int | None, str]]:
        """Devices whose birth announced a generation older than their current desired state."""
        announced = {
            row["device_id"]: row["generation"]
            for row in online
            if row["online"] and row["generation"] is not None
        }
        if not announced:
            return []
        now = utcnow()
        with self.db.transaction() as s:
            rows = s.execute(
                select(
                    DesiredRecord.device_id,
                    DesiredRecord.generation,
                    DesiredRecord.payload,
                    DesiredRecord.expires_at,
                ).where(DesiredRecord.device_id.in_(list(announced)))
            ).all()
        return [
            (device, generation, announced[device], payload)
            for device, generation, payload, expires_at in rows
            if generation > announced[device] and (expires_at is None or aware(expires_at) > now)
        ]

    def _write(self, reported: dict[str, dict[str, Any]], online: dict[str, dict[str, Any]]) -> None:
        with self.db.transaction() as s:
            stamp = binder(s, ReportedRecord.__table__.c.reported_at)
            reported_rows = [
                {**row, "reported_at": stamp(row["reported_at"]), "received_at": stamp(row["received_at"])}
                for row in reported.values()
            ]
            online_rows = [
                {**row, "since": stamp(row["since"]), "received_at": stamp(row["received_at"])}
                for row in online.values()
            ]
            for row in online_rows:
                del row["generation"]  # announced, not stored: answered after the write
            for table, rows, time in (
                (ReportedRecord.__table__, reported_rows, "reported_at"),
                (OnlineRecord.__table__, online_rows, "ordering"),
            ):
                if rows:
                    columns = list(rows[0])
                    values = [tuple(row[c] for c in columns) for row in rows]
                    upsert(s, table, columns, values, ["device_id"], unless_newer=time)  # type: ignore[arg-type]

    def _write_heartbeats(self, beats: dict[str, dict[str, Any]]) -> None:
        """Refresh the stored reports' times (a newer time only); log heartbeats without their report."""
        if not beats:
            return
        with self.db.transaction() as s:
            stored = dict(
                s.execute(
                    select(ReportedRecord.device_id, ReportedRecord.reported_at).where(
                        ReportedRecord.device_id.in_(list(beats))
                    )
                ).all()
            )
            for device, row in beats.items():
                held = stored.get(device)
                if held is None:
                    log.info("heartbeat from %s, whose full report the store does not hold yet", device)
                elif aware(held) < row["report_at"]:
                    log.info(
                        "heartbeat from %s stands by its report of %s; the store holds an older one (%s)",
                        device,
                        row["report_at"].isoformat(),
                        aware(held).isoformat(),
                    )
            stamp = binder(s, ReportedRecord.__table__.c.reported_at)
            columns = ["d", "t", "r", "h"]
            values = [
                (device, stamp(row["reported_at"]), stamp(row["received_at"]), row["heartbeat_s"])
                for device, row in beats.items()
                if device in stored
            ]
            at = bindparam("t", type_=ReportedRecord.reported_at.type)
            stmt = (
                update(ReportedRecord)
                .where(ReportedRecord.device_id == bindparam("d"), ReportedRecord.reported_at < at)
                .values(
                    reported_at=at,
                    received_at=bindparam("r", type_=ReportedRecord.received_at.type),
                    heartbeat_s=bindparam("h", type_=ReportedRecord.heartbeat_s.type),
                )
            )
            executemany(s, stmt, columns, values)

    def _parse(self, topic: str, payload: bytes, received_at: datetime) -> dict[str, Any] | None:
        parsed = topics.parse(topic)
        model = _PAYLOADS.get(parsed.kind) if parsed is not None else None
        if parsed is None or model is None:
            log.warning("message on unexpected topic %s ignored", topic)
            return None
        try:
            message = model.model_validate_json(payload)
            named = getattr(message, "device_id", parsed.device)
            if named != parsed.device:
                log.warning("%s on %s names device %r; ignored", parsed.kind, topic, named)
                return None
            return _row(message, parsed.device, payload, received_at)
        except ValidationError as e:
            log.warning(
                "malformed message on %s ignored: %s", topic, format_validation_error(e).replace("\n", "; ")
            )
            return None
        except UnicodeDecodeError:
            log.warning("message on %s is not UTF-8; ignored", topic)
            return None


_PAYLOADS: dict[str, type[Heartbeat | ReportedState | OnlineStatus]] = {
    "heartbeat": Heartbeat,
    "reported": ReportedState,
    "online": OnlineStatus,
}
"""The payload model of each topic kind the ingester takes."""


def _row(
    message: Heartbeat | ReportedState | OnlineStatus, device: str, payload: bytes, received_at: datetime
) -> dict[str, Any]:
    """The store row of one parsed message (its kind shows in the keys ``_write_batch`` sorts by)."""
    if isinstance(message, Heartbeat):
        return {
            "device_id": device,
            "reported_at": _utc(message.reported_at),
            "report_at": _utc(message.report_at),
            "received_at": received_at,
            "heartbeat_s": message.heartbeat_s,
        }
    if isinstance(message, ReportedState):
        return {
            "device_id": device,
            "generation_applied": message.generation_applied,
            "generation_received": message.generation_received,
            "deployment_status": message.deployment_status,
            "reason": message.reason,
            "payload": payload.decode(),
            "reported_at": _utc(message.reported_at),
            "received_at": received_at,
            "heartbeat_s": message.heartbeat_s,
        }
    return {
        "device_id": device,
        "online": message.online,
        "since": _utc(message.ts),
        "received_at": received_at,
        "session": message.session,
        "instance": message.instance,
        "ordering": online_ordering(message),
        "generation": message.generation,
    }


def _log_refused_answer(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and isinstance(future.exception(), PublishRefused):
        log.error("a desired state sent again was not delivered: %s", future.exception())


def log_crash(task: asyncio.Task[None]) -> None:
    """Log a background task that ended with an exception (ingestion would stop without a word)."""
    if not task.cancelled() and task.exception() is not None:
        log.error("%s crashed: ingestion stopped", task.get_name(), exc_info=task.exception())
