"""The agent's MQTT session: desired state in, reported state out, last will, commands.

``Link`` is an async context manager around one ``edgemqtt.Session`` (paho driven from the event loop)::

    async with Link(config) as link:
        raw = await link.desired.wait()           # newest desired-state payload (bytes)
        await link.publish_reported(report)       # queued; the newest pending report wins
        async for cmd in link.commands():         # CommandRequest
            await link.respond(CommandResponse(id=cmd.id, ok=True, output="pong"))

Topics (QoS 1, spelled in ``edgemqtt.topics``), with ``{d}`` the device id: ``edge/{d}/desired``
(retained, in), ``edge/{d}/cmd/req/+`` (in), ``edge/{d}/reported`` (retained, out),
``edge/{d}/heartbeat`` (out, not retained: sent only while connected and no report waits; a
heartbeat's PUBACK also keeps the connection alive, so no keep-alive pings flow between them),
``edge/{d}/cmd/res/{id}`` (out) and ``edge/{d}/online`` (retained; ``online: true`` on every
connect, ``online: false`` as the last will and on a clean shutdown).

The birth message announces ``generation``, the generation the agent has applied (the agent sets
it): a cloud that sees a device behind answers with its current signed desired state, so desired
state arrives even from a broker that kept no retained message for the device (a cluster node
that holds it died, say). Retained delivery stays the fast path; duplicates are harmless, as the
agent ignores a generation it already has.

Every connection attempt takes a new session number (``next_session``: one more than the last,
and at least the time in microseconds; the last one is kept in ``<state_dir>/mqtt-session`` so a
restarted agent, even with its clock set back, continues above it). The will and the birth of one
connection carry it, so the cloud orders online/offline by it: a SIGKILLed agent's will is newer
than its birth, and older than the birth of the agent that restarted after it. ``instance`` names
this agent process. Two agents configured with one device id take each other's session over;
the link sees it on any broker: it subscribes to its own ``edge/{d}/online``, and a message there
from another instance with a session above the one this link lost (the other's will, published
when we took the session back) means another client connected as this device in between (MQTT 5
brokers also say so, DISCONNECT reason 142). The link then
logs an error, keeps it in ``client_conflict`` (reported to the cloud) and from then on waits at
least ``TAKEOVER_PAUSE_S`` before reconnecting, so two agents do not knock each other off the
broker in a tight loop.

The link does MQTT I/O and nothing else: desired-state payloads are handed over as raw bytes for
``agent.admission`` to judge. A new payload replaces the one not yet taken and wakes the waiter.
Reports are never handed to paho while offline: only the newest is kept and sent on reconnect.
At most one report is in flight, so reports reach the broker in order; the one in flight when a
connection drops is resent by paho on reconnect, before the newest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from types import TracebackType

from pydantic import ValidationError

from agent.config import AgentConfig
from edgemqtt import topics
from edgemqtt.session import (
    SESSION_TAKEN_OVER,
    TAKEOVER_PAUSE_S,
    Connected,
    ConnectFailed,
    Disconnected,
    Event,
    Publication,
    PublishRefused,
    Received,
    Session,
    Subscribed,
)
from modules.contract import (
    ClientConflict,
    CommandRequest,
    CommandResponse,
    Heartbeat,
    OnlineStatus,
    ReportedState,
    format_validation_error,
    utcnow,
)

log = logging.getLogger(__name__)

COMMAND_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_PENDING_COMMANDS = 64
CLOSE_TIMEOUT_S = 5.0
SESSION_FILE = "mqtt-session"


def next_session(last: int | None, now_us: int) -> int:
    """The session number of the next connection: above ``last``, and at least ``now_us``."""
    return max((last or 0) + 1, now_us)


class DesiredSlot:
    """The newest desired-state payload not yet taken, and an event set while there is one.

    Touched only on the event loop. A payload that arrives before the previous one was taken
    replaces it: the agent acts on the latest desired state only.
    """

    def __init__(self) -> None:
        self.ready = asyncio.Event()
        self._payload: bytes | None = None
        self._wakers: list[asyncio.Event] = []

    def also_wake(self, event: asyncio.Event) -> None:
        """Set ``event`` too whenever a payload arrives (and now, if one is waiting)."""
        self._wakers.append(event)
        if self._payload is not None:
            event.set()

    def put(self, payload: bytes) -> None:
        """Store ``payload`` in place of any untaken one and wake the waiters."""
        self._payload = payload
        self.ready.set()
        for event in self._wakers:
            event.set()

    def take(self) -> bytes | None:
        """The untaken payload, if any; the slot is empty afterwards."""
        payload, self._payload = self._payload, None
        self.ready.clear()
        return payload

    async def wait(self) -> bytes:
        """Wait for a payload and take it."""
        while True:
            await self.ready.wait()
            payload = self.take()
            if payload is not None:
                return payload


class Link:
    """One device's MQTT session; use as ``async with Link(config) as link``.

    Entering starts connecting in the background and returns at once: a broker that is down at
    start-up is retried with capped exponential back-off while the agent runs from its local
    state. Leaving publishes ``online: false`` (when connected) and disconnects cleanly.
    """

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        device = config.device_id
        self.topic_desired = topics.desired(device)
        self.topic_reported = topics.reported(device)
        self.topic_heartbeat = topics.heartbeat(device)
        self.topic_online = topics.online(device)
        self.desired = DesiredSlot()
        self._commands: asyncio.Queue[CommandRequest] = asyncio.Queue(MAX_PENDING_COMMANDS)
        self._connected = asyncio.Event()
        self._session_up = False
        self._mqtt: Session | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._connects = 0
        self._connect_wakers: list[asyncio.Event] = []
        self._failed_attempts = 0
        self._offline_since = time.monotonic()
        self._offline_for: float | None = None
        self._report_wake = asyncio.Event()
        self._pending_report: ReportedState | None = None
        self._superseded = 0
        self._report_idle = asyncio.Event()
        self._report_idle.set()
        self.instance = uuid.uuid4().hex[:16]
        """This agent process, as the cloud sees it in ``edge/{d}/online``."""
        self.session: int | None = None
        """The session number of the current (or last attempted) connection."""
        self.client_conflict: ClientConflict | None = None
        """Set once another client took this device's session over (reported to the cloud)."""
        self.generation: int | None = None
        """The generation applied, announced in the birth message of every session (see ``announce``)."""
        self._announced: int | None = None
        self._session_file = config.state_dir / SESSION_FILE
        self._lost_session: int | None = None

    # ---- public API ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether the session is up and subscribed (as last heard from paho's thread)."""
        return self._connected.is_set()

    async def wait_connected(self) -> None:
        """Wait until the session is up and the broker acknowledged the subscriptions."""
        await self._connected.wait()

    @property
    def sessions(self) -> int:
        """How many sessions came up so far (the agent reports afresh in each new one)."""
        return self._connects

    def announce(self, generation: int) -> None:
        """Set the generation the birth of every later session announces.

        When the current session's birth went out before the agent knew it (the link connects
        while the agent loads its state), the birth is published again now with it.
        """
        self.generation = generation
        if self._mqtt is not None and self.connected and self._announced is None:
            future = self._mqtt.publish(self._online(True))
            future.add_done_callback(lambda f: self._log_refusal(f, "announcement of the applied generation"))

    def also_wake_on_connect(self, event: asyncio.Event) -> None:
        """Set ``event`` whenever a session comes up (a report queued while offline is old by then)."""
        self._connect_wakers.append(event)

    async def commands(self) -> AsyncIterator[CommandRequest]:
        """Well-formed command requests, in arrival order (malformed ones are answered here)."""
        while True:
            yield await self._commands.get()

    async def publish_reported(self, state: ReportedState) -> None:
        """Queue ``state`` for ``edge/{d}/reported`` (retained, QoS 1); it replaces any unsent report.

        Returns at once; the report goes out as soon as the session is up and the previous report
        was acknowledged. ``flush_reported`` waits for it.
        """
        if state.device_id != self.config.device_id:
            raise ValueError(
                f"report for device {state.device_id!r} on the link of {self.config.device_id!r}"
            )
        if self._pending_report is not None:
            self._superseded += 1
        self._pending_report = state
        self._report_idle.clear()
        self._report_wake.set()

    async def publish_heartbeat(self, heartbeat: Heartbeat) -> None:
        """Publish ``heartbeat`` on ``edge/{d}/heartbeat`` (QoS 1, not retained), without waiting.

        Dropped while offline or while a report waits: the report says more, and a heartbeat
        queued offline would only be old news (the next session starts with a full report).
        """
        if heartbeat.device_id != self.config.device_id:
            raise ValueError(
                f"heartbeat for device {heartbeat.device_id!r} on the link of {self.config.device_id!r}"
            )
        if self._mqtt is None or not self.connected or self._pending_report is not None:
            log.debug("heartbeat skipped (offline, or a report waits)")
            return
        future = self._mqtt.publish(
            Publication(self.topic_heartbeat, heartbeat.model_dump_json().encode(), qos=1, retain=False)
        )
        future.add_done_callback(lambda f: self._log_refusal(f, "heartbeat"))

    async def flush_reported(self) -> None:
        """Wait until the newest report was acknowledged by the broker (or refused by it)."""
        await self._report_idle.wait()

    async def respond(self, response: CommandResponse) -> None:
        """Publish ``response`` on ``edge/{d}/cmd/res/{id}`` (QoS 1, not retained)."""
        if not COMMAND_ID_RE.match(response.id):
            raise ValueError(f"command id {response.id!r} cannot be used in a topic")
        payload = response.model_dump_json().encode()
        topic = topics.command_response(self.config.device_id, response.id)
        future = self._require_session().publish(Publication(topic, payload))
        future.add_done_callback(lambda f: self._log_refusal(f, f"response to command {response.id}"))

    # ---- lifecycle ----------------------------------------------------------------------------

    async def __aenter__(self) -> Link:
        username = self.config.mqtt_username
        broker = self.config.broker
        self._mqtt = Session(
            broker.endpoint(username, broker.read_password()),
            client_id=self.config.mqtt_client_id,
            subscriptions=[
                self.topic_desired,
                topics.command_requests(self.config.device_id),
                self.topic_online,
            ],
            options=broker.session_options(),
            will=self._will,
            birth=lambda: self._online(True),
        )
        self._mqtt.start()
        self._tasks = [
            asyncio.create_task(self._dispatch(), name=f"link-{self.config.device_id}-events"),
            asyncio.create_task(self._send_reports(), name=f"link-{self.config.device_id}-reports"),
        ]
        for task in self._tasks:
            task.add_done_callback(_log_crash)
        log.info(
            "connecting to %s as %s (%s%s)",
            self._mqtt.endpoint.url,
            self.config.mqtt_client_id,
            self.config.broker.protocol,
            f", user {username}" if username else "",
        )
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closing = True
        mqtt = self._require_session()
        if self.connected and not self._report_idle.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.flush_reported(), CLOSE_TIMEOUT_S)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        farewell = self._online(False) if self.connected else None
        await mqtt.close(farewell, CLOSE_TIMEOUT_S)
        self._connected.clear()
        log.info(
            "disconnected from %s (%s)",
            mqtt.address.url,
            "clean shutdown" if farewell else "was offline",
        )

    # ---- internals ----------------------------------------------------------------------------

    def _require_session(self) -> Session:
        if self._mqtt is None:
            raise RuntimeError("the link is not open: use 'async with Link(config) as link'")
        return self._mqtt

    @property
    def _url(self) -> str:
        """The node the session is connected (or connecting) to."""
        return self._require_session().address.url

    def _will(self) -> Publication:
        """The last will of the next connection attempt, which takes a new session number."""
        self._lost_session = self.session
        self.session = next_session(self._last_session(), time.time_ns() // 1000)
        self._save_session(self.session)
        return self._online(False)

    def _last_session(self) -> int | None:
        if self.session is not None:
            return self.session
        try:
            return int(self._session_file.read_text().strip())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            log.warning(
                "cannot read the last MQTT session number from %s (%s); using the clock",
                self._session_file,
                e,
            )
            return None

    def _save_session(self, session: int) -> None:
        tmp = self._session_file.with_name(f".{SESSION_FILE}.tmp")
        try:
            self._session_file.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(f"{session}\n")
            os.replace(tmp, self._session_file)
        except OSError as e:
            log.warning("cannot record the MQTT session number in %s: %s", self._session_file, e)

    def _online(self, online: bool) -> Publication:
        if online:
            self._announced = self.generation
        status = OnlineStatus(
            online=online,
            session=self.session,
            instance=self.instance,
            generation=self.generation if online else None,
        )
        return Publication(self.topic_online, status.model_dump_json().encode(), qos=1, retain=True)

    async def _dispatch(self) -> None:
        mqtt = self._require_session()
        while True:
            event = await mqtt.next_event()
            self._handle(event)

    def _handle(self, event: Event) -> None:
        if isinstance(event, Received):
            self._received(event)
        elif isinstance(event, Connected):
            self._on_connected(event)
        elif isinstance(event, Disconnected):
            self._on_disconnected(event)
        elif isinstance(event, ConnectFailed):
            self._failed_attempts += 1
            log.warning(
                "cannot connect to %s (attempt %d): %s; retrying with back-off up to %d s",
                event.address.url,
                self._failed_attempts,
                _describe(event.error),
                self.config.broker.reconnect_max_s,
            )
        elif isinstance(event, Subscribed):
            self._on_subscribed(event)

    def _on_connected(self, event: Connected) -> None:
        if event.reason.is_failure:
            self._failed_attempts += 1
            log.error(
                "the broker at %s refused the connection (attempt %d): %s; check the credentials; "
                "retrying with back-off up to %d s",
                event.address.url,
                self._failed_attempts,
                event.reason,
                self.config.broker.reconnect_max_s,
            )
            return
        self._session_up = True
        self._failed_attempts = 0

    def _on_subscribed(self, event: Subscribed) -> None:
        if not self._session_up:
            return
        for topic, reason in event.results:
            if reason.is_failure:
                log.error("the broker refused the subscription to %s: %s", topic, reason)
        self._connects += 1
        offline = time.monotonic() - self._offline_since
        self._offline_for = offline if self._pending_report is not None else None
        self._connected.set()
        self._report_wake.set()
        for waker in self._connect_wakers:
            waker.set()
        subscribed = ", ".join(t for t, reason in event.results if not reason.is_failure) or "nothing"
        if self._connects == 1:
            message = "connected to %s after %.1f s; subscribed to %s"
        else:
            message = "reconnected to %s after %.1f s offline; resubscribed to %s"
        log.info(message, self._url, offline, subscribed)

    def _on_disconnected(self, event: Disconnected) -> None:
        if not self._session_up:
            return  # the end of a refused attempt, already logged
        self._session_up = False
        self._connected.clear()
        self._offline_since = time.monotonic()
        if self._closing:
            return
        if event.by_broker and event.reason.value == SESSION_TAKEN_OVER:
            self._taken_over("the broker said another client took this session over")
            return
        how = f"the broker sent DISCONNECT: {event.reason}" if event.by_broker else "connection lost"
        log.warning(
            "disconnected from %s (%s); reconnecting with back-off %d-%d s",
            self._url,
            how,
            self.config.broker.reconnect_min_s,
            self.config.broker.reconnect_max_s,
        )

    def _taken_over(self, evidence: str) -> None:
        takeovers = self.client_conflict.takeovers + 1 if self.client_conflict else 1
        detail = (
            f"another MQTT client connected as {self.config.mqtt_client_id} and took this session over "
            f"({takeovers} time(s) since start; {evidence}): is a second agent configured with device id "
            f"{self.config.device_id}?"
        )
        self.client_conflict = ClientConflict(detected_at=utcnow(), takeovers=takeovers, detail=detail)
        self._require_session().hold_off_s = TAKEOVER_PAUSE_S
        log.error("%s; reconnecting no sooner than %.0f s after each disconnect", detail, TAKEOVER_PAUSE_S)

    def _online_seen(self, message: Received) -> None:
        """Our own online topic: another instance's message there means it took our session over."""
        try:
            status = OnlineStatus.model_validate_json(message.payload)
        except ValidationError:
            log.warning("ignoring a malformed message on %s", message.topic)
            return
        if status.instance in (None, self.instance):
            return
        # A session above the one this link lost: another agent connected as us since (its will,
        # published when we took the session back, says so too). Below it: a predecessor's leftover.
        newer = (
            status.session is not None
            and self._lost_session is not None
            and status.session > self._lost_session
        )
        if newer or (status.online and not message.retain):
            self._taken_over(f"agent instance {status.instance} used it (session {status.session})")

    def _received(self, message: Received) -> None:
        where = topics.parse(message.topic)
        if message.topic == self.topic_desired:
            if not message.payload:
                log.warning(
                    "the retained desired state on %s was cleared; keeping the current one", message.topic
                )
                return
            log.debug("desired state received (%d bytes, retained=%s)", len(message.payload), message.retain)
            self.desired.put(message.payload)
        elif message.topic == self.topic_online:
            self._online_seen(message)
        elif where is not None and where.kind == "cmd/req" and where.device == self.config.device_id:
            assert where.command_id is not None
            self._command(where.command_id, message.payload)
        else:
            log.warning("ignoring a message on unexpected topic %s", message.topic)

    def _command(self, topic_id: str, payload: bytes) -> None:
        try:
            request = CommandRequest.model_validate_json(payload)
        except ValidationError as e:
            problem = "; ".join(format_validation_error(e).splitlines())
            self._reject_command(topic_id, f"malformed command: {problem}")
            return
        if request.id != topic_id:
            self._reject_command(
                topic_id, f"the payload's id {request.id!r} does not match the topic's {topic_id!r}"
            )
            return
        try:
            self._commands.put_nowait(request)
        except asyncio.QueueFull:
            self._reject_command(topic_id, f"the agent is busy: {MAX_PENDING_COMMANDS} commands wait already")
            return
        log.info("command %s received: %s", request.id, request.command)

    def _reject_command(self, topic_id: str, error: str) -> None:
        if not COMMAND_ID_RE.match(topic_id):
            log.warning(
                "dropping a command to %s with an unusable id %r: %s", self.config.device_id, topic_id, error
            )
            return
        log.warning("command %s rejected: %s", topic_id, error)
        response = CommandResponse(id=topic_id, ok=False, error=error)
        future = self._require_session().publish(
            Publication(
                topics.command_response(self.config.device_id, topic_id),
                response.model_dump_json().encode(),
            )
        )
        future.add_done_callback(lambda f: self._log_refusal(f, f"error response to command {topic_id}"))

    async def _send_reports(self) -> None:
        mqtt = self._require_session()
        while True:
            await self._report_wake.wait()
            self._report_wake.clear()
            if self._pending_report is None or not self.connected:
                continue
            state, self._pending_report = self._pending_report, None
            superseded, self._superseded = self._superseded, 0
            offline_for, self._offline_for = self._offline_for, None
            payload = state.model_dump_json().encode()
            try:
                # Waits across reconnects: paho resends an unacknowledged report itself.
                await mqtt.publish(Publication(self.topic_reported, payload, qos=1, retain=True))
            except PublishRefused as e:
                log.error("report (generation %d) refused: %s", state.generation_applied, e)
            else:
                self._log_report(state, superseded, offline_for)
            if self._pending_report is None:
                self._report_idle.set()

    def _log_report(self, state: ReportedState, superseded: int, offline_for: float | None) -> None:
        what = f"report (generation {state.generation_applied}, {state.deployment_status})"
        dropped = f"; {superseded} older unsent report(s) dropped" if superseded else ""
        if offline_for is not None:
            log.info("%s flushed after %.1f s offline%s", what, offline_for, dropped)
        else:
            log.debug("%s published%s", what, dropped)

    @staticmethod
    def _log_refusal(future: asyncio.Future[None], what: str) -> None:
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            log.error("%s not delivered: %s", what, error)


def _describe(error: BaseException | None) -> str:
    if error is None:
        return "connection failed"
    return f"{type(error).__name__}: {error}"


def _log_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("link task %s crashed", task.get_name(), exc_info=task.exception())
