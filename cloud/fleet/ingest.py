"""Ingest what devices report: ``ReportedState`` and ``OnlineStatus`` into the store, in batches.

The ingester subscribes to ``$share/cloud/edge/+/reported`` (several cloud processes split the
fleet's reports between them) and ``edge/+/online``. paho's thread only keeps the newest raw
message per topic (so what waits is bounded by the fleet's size, however slow the store); every
``flush_interval_s`` those are parsed and written with one ``executemany`` upsert per table inside
one transaction. A batch whose write fails is kept for the next flush. A stored row is replaced
only by a newer one: reports by ``reported_at`` (one device's reports may be split between
cloud workers, and a late, older report must not undo a newer one), online messages by
``online_ordering`` (the agent's MQTT session number, offline after online within one session),
never by wall-clock fields written at different moments: a SIGKILLed agent's will is armed at
connect time, before its birth message, yet must win over it. A message that does not parse,
or whose device id differs from its topic's, is counted and logged, never written; an empty one
(a removed device's retained message being cleared) is skipped.

With a ``session`` name the ingester's MQTT session outlives it (``SESSION_EXPIRY_S``): reports
published while the cloud process is away are queued by the broker and ingested on its return.
While away, such a session stays in the shared subscription group, so the broker keeps queueing
its share of the fleet's reports for it; give a session name only to a worker that comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

import paho.mqtt.client as mqtt
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from cloud.fleet.mqtt import Endpoint, connect, disconnect, new_client
from cloud.fleet.sql import aware, binder, upsert
from cloud.store.db import Database
from cloud.store.fleet import OnlineRecord, ReportedRecord
from modules.contract import OnlineStatus, ReportedState, format_validation_error, utcnow

log = logging.getLogger(__name__)

REPORTED_SUBSCRIPTION = "$share/cloud/edge/+/reported"
ONLINE_SUBSCRIPTION = "edge/+/online"
FLUSH_INTERVAL_S = 0.1
SESSION_EXPIRY_S = 3600
SUBSCRIBE_TIMEOUT_S = 10.0
RECONNECT_MAX_S = 2
"""paho retries a lost connection after 1 s, then every this many seconds. Short: a cloud worker is
one client, not a fleet, and the fleet's retained reports wait for it on the broker's return."""


@dataclass
class IngestStats:
    """Counters since start: messages received, written, and rejected as malformed.

    A message is counted once its batch was written or rejected; one replaced by a newer message
    on its topic before that counts as its successor does.
    """

    received: int = 0
    written: int = 0
    invalid: int = 0


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
    if not topic.endswith("/online"):
        return None
    try:
        return online_ordering(OnlineStatus.model_validate_json(payload))
    except ValidationError:
        return None


def _topic_device(topic: str, kind: str) -> str | None:
    parts = topic.split("/")
    if len(parts) == 3 and parts[0] == "edge" and parts[2] == kind:
        return parts[1]
    return None


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
    ) -> None:
        self.db = db
        self.endpoint = endpoint
        self.session = session
        self.session_expiry_s = session_expiry_s
        self.flush_interval_s = flush_interval_s
        self.stats = IngestStats()
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._client: mqtt.Client | None = None
        self._task: asyncio.Task[None] | None = None
        self._flushed: asyncio.Condition | None = None

    async def __aenter__(self) -> Ingestor:
        client = new_client(self.endpoint, "edgectl-ingest", client_id=self.session)
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.reconnect_delay_set(1, RECONNECT_MAX_S)
        self._client = client
        await asyncio.to_thread(
            connect,
            client,
            self.endpoint,
            on_connected=self._subscribe,
            session_expiry_s=self.session_expiry_s if self.session else 0,
        )
        if not await asyncio.to_thread(self._subscribed.wait, SUBSCRIBE_TIMEOUT_S):
            await asyncio.to_thread(disconnect, client)
            raise TimeoutError(
                f"the MQTT broker at {self.endpoint.url} did not acknowledge the subscriptions"
            )
        self._flushed = asyncio.Condition()
        self._task = asyncio.create_task(self._run(), name="fleet-ingest")
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._client is not None:
            await asyncio.to_thread(disconnect, self._client)
        await asyncio.to_thread(self.flush)

    @property
    def connected(self) -> bool:
        """Whether the MQTT session is up now (paho reconnects a lost one by itself)."""
        return self._client is not None and self._client.is_connected()

    async def _run(self) -> None:
        assert self._flushed is not None
        while True:
            await asyncio.sleep(self.flush_interval_s)
            received = self.stats.received
            await asyncio.to_thread(self.flush)
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
        except TimeoutError:
            return False
        return True

    # ---- paho's thread -----------------------------------------------------------------------

    def _subscribe(self, client: mqtt.Client) -> None:
        client.subscribe([(REPORTED_SUBSCRIPTION, 1), (ONLINE_SUBSCRIPTION, 1)])

    def _on_subscribe(self, _c: mqtt.Client, _u: object, _mid: int, reasons: list[Any], _p: object) -> None:
        failed = [str(r) for r in reasons if r.is_failure]
        if failed:
            log.error("the broker refused the subscriptions to reports: %s", ", ".join(failed))
            return
        self._subscribed.set()

    def _on_message(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        self.accept(message.topic, bytes(message.payload))

    def accept(self, topic: str, payload: bytes) -> None:
        """Queue one received message for the next flush; a newer one on the same topic replaces it."""
        if not payload:
            return  # a cleared retained message (a removed device): nothing to ingest
        ordering = _online_ordering(topic, payload)
        with self._lock:
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
        with self._lock:
            return len(self._pending)

    def flush(self) -> int:
        """Write what arrived since the last flush; returns how many messages were written.

        When the write fails the batch is put back (behind anything newer that arrived meanwhile)
        for the next flush, and the failure is logged.
        """
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return 0
        reported: dict[str, dict[str, Any]] = {}
        online: dict[str, dict[str, Any]] = {}
        valid: dict[str, _Pending] = {}
        invalid = 0
        for topic, entry in batch.items():
            row = self._parse(topic, entry.payload, entry.received_at)
            if row is None:
                invalid += entry.count
                continue
            valid[topic] = entry
            (online if "online" in row else reported)[row["device_id"]] = row
        self.stats.received += invalid
        self.stats.invalid += invalid
        if not valid:
            return 0
        try:
            self._write(reported, online)
        except (SQLAlchemyError, OSError) as e:
            self._put_back(valid)
            log.error(
                "writing %d report(s) to the store failed (kept for the next attempt): %s",
                len(valid),
                str(e).splitlines()[0] if str(e) else type(e).__name__,
            )
            return 0
        written = sum(entry.count for entry in valid.values())
        self.stats.received += written
        self.stats.written += written
        return written

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
            for table, rows, time in (
                (ReportedRecord.__table__, reported_rows, "reported_at"),
                (OnlineRecord.__table__, online_rows, "ordering"),
            ):
                if rows:
                    columns = list(rows[0])
                    values = [tuple(row[c] for c in columns) for row in rows]
                    upsert(s, table, columns, values, ["device_id"], unless_newer=time)  # type: ignore[arg-type]

    def _put_back(self, batch: dict[str, _Pending]) -> None:
        with self._lock:
            for topic, entry in batch.items():
                newer = self._pending.get(topic)
                self._pending[topic] = (
                    entry
                    if newer is None
                    else _Pending(newer.payload, newer.received_at, newer.count + entry.count, newer.ordering)
                )

    def _parse(self, topic: str, payload: bytes, received_at: datetime) -> dict[str, Any] | None:
        device = _topic_device(topic, "reported")
        try:
            if device is not None:
                state = ReportedState.model_validate_json(payload)
                if state.device_id != device:
                    log.warning("report on %s names device %r; ignored", topic, state.device_id)
                    return None
                return {
                    "device_id": device,
                    "generation_applied": state.generation_applied,
                    "generation_received": state.generation_received,
                    "deployment_status": state.deployment_status,
                    "reason": state.reason,
                    "payload": payload.decode(),
                    "reported_at": _utc(state.reported_at),
                    "received_at": received_at,
                    "heartbeat_s": state.heartbeat_s,
                }
            device = _topic_device(topic, "online")
            if device is None:
                log.warning("message on unexpected topic %s ignored", topic)
                return None
            status = OnlineStatus.model_validate_json(payload)
            return {
                "device_id": device,
                "online": status.online,
                "since": _utc(status.ts),
                "received_at": received_at,
                "session": status.session,
                "instance": status.instance,
                "ordering": online_ordering(status),
            }
        except ValidationError as e:
            log.warning(
                "malformed message on %s ignored: %s", topic, format_validation_error(e).replace("\n", "; ")
            )
            return None
        except UnicodeDecodeError:
            log.warning("message on %s is not UTF-8; ignored", topic)
            return None
