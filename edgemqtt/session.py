"""One MQTT session on the event loop: the one place where paho-mqtt meets asyncio, no thread per client.

``Session`` runs one paho client (callback API v2) in paho's external-loop mode, as aiomqtt
does: ``on_socket_open``/``on_socket_close`` add and remove the socket as a reader of the event
loop (``loop_read``), ``on_socket_register_write``/``on_socket_unregister_write`` add and remove
it as a writer (``loop_write``), and a timer calls ``loop_misc`` (keepalive pings, a broker that
stopped answering) every quarter keepalive (1 to 15 s) while a socket is open. Outgoing packets are
written on the next loop iteration (several at once); the socket becomes a writer only when the
kernel's buffer is full. Thousands of clients share one thread.

paho reconnects by itself only under ``loop_start``/``loop_forever``, so ``_maintain`` (one task
per session) does it: connect, wait until the socket closes, wait a back-off that doubles from
``reconnect_min_s`` up to ``reconnect_max_s`` (with jitter, so a fleet does not reconnect in
lockstep after a broker restart; back to the minimum after a session was accepted), connect
again. An endpoint with several addresses (the nodes of a cluster) fails over: the first attempt
goes to the first node; after a failed attempt or a lost connection the next one goes to another
node drawn at random, so the clients of a dead node spread over the others.
The TCP connect and TLS handshake block, so ``reconnect`` runs on a small thread pool shared by
every session of the process (not the loop's default executor, where file writes would queue
in front of connects); the socket callbacks it fires there hop to the loop with
``call_soon_threadsafe``.
Everything else happens on the event loop. QoS 1 messages in flight are kept across reconnects.

Callbacks only hand plain events (``Connected``, ``ConnectFailed``, ``Disconnected``, ``Received``,
``Subscribed``) to ``next_event`` (or ``messages``) and resolve futures: publish acknowledgements
and ``wait_up``. Two things happen inside
paho's callbacks on purpose, because they must happen on every connection before anything else:
``on_pre_connect`` re-arms the last will, and ``on_connect`` subscribes and publishes the birth
message, so a reconnect always resubscribes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from edgemqtt.endpoint import Address, BrokerUnavailable, Endpoint

log = logging.getLogger(__name__)
paho_log = logging.getLogger(f"{__name__}.paho")

MISC_INTERVAL_S = (1.0, 15.0)
"""Bounds of how often ``loop_misc`` runs while a socket is open (a quarter of the keepalive)."""
CONNECT_THREADS = 4
"""Blocking connects (TCP, TLS handshake) in flight at once, for all sessions of the process."""

_connector: ThreadPoolExecutor | None = None


def _connect_pool() -> ThreadPoolExecutor:
    global _connector
    if _connector is None:
        _connector = ThreadPoolExecutor(CONNECT_THREADS, thread_name_prefix="mqtt-connect")
    return _connector


@dataclass(frozen=True)
class Publication:
    """One message to publish."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(frozen=True)
class Connected:
    """The broker answered a CONNECT; ``reason.is_failure`` means it refused (bad credentials…)."""

    reason: ReasonCode
    session_present: bool
    address: Address


@dataclass(frozen=True)
class ConnectFailed:
    """No MQTT connection could be opened (refused, unreachable, TLS handshake); retried with back-off."""

    error: BaseException | None
    address: Address


@dataclass(frozen=True)
class Disconnected:
    """The connection ended; ``by_broker`` when the broker sent DISCONNECT with ``reason``."""

    reason: ReasonCode
    by_broker: bool


@dataclass(frozen=True)
class Received:
    """A message arrived on a subscribed topic."""

    topic: str
    payload: bytes
    retain: bool


@dataclass(frozen=True)
class Subscribed:
    """The broker's answer to the subscriptions made on connect: ``(topic, reason)`` pairs."""

    results: tuple[tuple[str, ReasonCode], ...]


Event = Connected | ConnectFailed | Disconnected | Received | Subscribed


def _why(error: BaseException | None) -> str:
    if error is None:
        return "connection failed"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return f"{type(error).__name__}: {error}"


def log_event(event: Event, url: str) -> None:
    """Log a connection event the plain way (for sessions whose owner has nothing to add)."""
    if isinstance(event, Connected):
        if event.reason.is_failure:
            log.error("the MQTT broker at %s refused the connection: %s", event.address.url, event.reason)
        else:
            log.info("connected to %s", event.address.url)
    elif isinstance(event, ConnectFailed):
        log.warning("cannot reach the MQTT broker at %s: %s; retrying", event.address.url, _why(event.error))
    elif isinstance(event, Disconnected):
        how = f"the broker sent DISCONNECT: {event.reason}" if event.by_broker else "connection lost"
        log.warning("disconnected from %s (%s); reconnecting", url, how)
    elif isinstance(event, Subscribed):
        for topic, reason in event.results:
            if reason.is_failure:
                log.error("the broker at %s refused the subscription to %s: %s", url, topic, reason)


class PublishRefused(Exception):
    """The broker (or paho's full outgoing queue) refused a publication."""


SESSION_TAKEN_OVER = 142
"""MQTT 5 DISCONNECT reason: another client connected with this client id."""
TAKEOVER_PAUSE_S = 30.0
"""The least wait before reconnecting once another client took this client id's session over."""


def backoff_delay(failures: int, min_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Seconds to wait before the next attempt after ``failures`` failed ones in a row (0: first retry).

    ``min_s * 2**failures`` stretched by a random factor between 1 and 1.5, then capped at ``max_s``:
    clients that lost the broker together spread their attempts, and keep that spread once capped.
    """
    ceiling = min_s * 2 ** min(failures, 32)
    return min(ceiling * (1.0 + 0.5 * (rng or random).random()), max_s)


@dataclass(frozen=True)
class SessionOptions:
    """How a session behaves: protocol, keepalive, reconnect back-off, queues, persistence."""

    protocol: str = "mqttv5"
    """``mqttv5`` or ``mqttv311``."""
    keepalive_s: int = 30
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    max_queued_messages: int = 100
    """Outgoing messages paho holds (offline or beyond the in-flight window); 0 = no cap."""
    max_inflight: int = 20
    """QoS 1 messages sent and not yet acknowledged."""
    session_expiry_s: int = 0
    """MQTT 5: how long the broker keeps the session (and queues QoS 1 messages) after a disconnect;
    0 starts clean every time."""
    subscribe_qos: int = 1
    """The QoS of the subscriptions. 0 where the broker cannot move a QoS 1 subscription's queue when
    a node dies (RabbitMQ 3.10 keeps it on the dead node): messages may then be lost only across a
    lost connection, and the fleet's protocol re-sends what matters on every session start."""

    def __post_init__(self) -> None:
        if self.protocol not in ("mqttv5", "mqttv311"):
            raise ValueError(f"protocol {self.protocol!r}: expected mqttv5 or mqttv311")
        if self.session_expiry_s and self.protocol != "mqttv5":
            raise ValueError("session_expiry_s needs MQTT 5")
        if self.subscribe_qos not in (0, 1):
            raise ValueError(f"subscribe_qos {self.subscribe_qos}: expected 0 or 1")


class Session:
    """A paho client on the asyncio event loop whose callbacks arrive as events.

    ``will`` and ``birth`` build the last will and the message published on every connect; ``will``
    may be called on an executor thread, so both must only build bytes. Call ``start`` on the loop,
    read events with ``next_event`` (or only messages with ``messages``), publish with ``publish``
    (a future resolved by the broker's acknowledgement) and end with ``close``. ``wait_up`` waits
    for the first accepted session, for callers that need the broker now.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        client_id: str,
        subscriptions: list[str],
        options: SessionOptions | None = None,
        will: Callable[[], Publication] | None = None,
        birth: Callable[[], Publication] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.options = options = options or SessionOptions()
        self._subscriptions = list(subscriptions)
        self._will = will
        self._birth = birth
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._acks: dict[int, asyncio.Future[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self._connecting: asyncio.Future[Any] | None = None
        self._down = asyncio.Event()
        self._down.set()
        self._up = asyncio.Event()
        self._waiters: list[asyncio.Future[str | None]] = []
        self._failures = 0
        self._node = 0
        self._session_accepted = False
        self.hold_off_s = 0.0
        """The least wait before any reconnect (set once another client took our session over)."""
        self.refused: tuple[tuple[str, ReasonCode], ...] = ()
        """Subscriptions the broker refused in the current session, with its reasons."""
        self._closing = False
        self._fd: int | None = None
        self._misc: asyncio.TimerHandle | None = None
        self._misc_s = min(max(options.keepalive_s / 4, MISC_INTERVAL_S[0]), MISC_INTERVAL_S[1])
        self._writer_on = False
        self._flush_due = False
        v5 = options.protocol == "mqttv5"
        extra: dict[str, Any] = {} if v5 else {"clean_session": True}
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            **extra,
        )
        client = self._client
        client.on_log = self._on_log
        client.suppress_exceptions = True
        client.max_queued_messages_set(options.max_queued_messages)
        client.max_inflight_messages_set(options.max_inflight)
        if endpoint.username is not None:
            client.username_pw_set(endpoint.username, endpoint.password)
        if any(a.tls for a in endpoint.addresses):
            client.tls_set_context(endpoint.tls_context())
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write

    # ---- public API ---------------------------------------------------------------------------

    @property
    def address(self) -> Address:
        """The node the current (or next) connection attempt goes to."""
        return self.endpoint.addresses[self._node]

    @property
    def is_up(self) -> bool:
        """Whether a session is accepted and its subscriptions acknowledged now."""
        return self._up.is_set()

    def start(self) -> None:
        """Begin connecting in the background (call on the event loop); never raises for a down broker."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._task = self._loop.create_task(self._maintain(), name="mqtt-connection")

    async def wait_up(self, timeout_s: float) -> None:
        """Wait until a session is accepted and subscribed; BrokerUnavailable saying why not.

        Gives up once every node failed once (unreachable, refused, or a subscription refused)
        or after ``timeout_s``; the session goes on retrying in the background either way.
        """
        assert self._loop is not None, "start() first"
        if self._up.is_set():
            return
        waiter: asyncio.Future[str | None] = self._loop.create_future()
        self._waiters.append(waiter)
        try:
            error = await asyncio.wait_for(waiter, timeout_s)
        except asyncio.TimeoutError:
            raise BrokerUnavailable(
                f"the MQTT broker at {self.endpoint.url} did not answer within {timeout_s:g} s"
            ) from None
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        if error is not None:
            raise BrokerUnavailable(error)

    async def next_event(self) -> Event:
        """The next connection event or message, in the order paho saw them."""
        return await self._events.get()

    async def messages(self) -> AsyncIterator[Received]:
        """The messages received, in order; connection events are logged (at ``log``) and skipped."""
        while True:
            event = await self._events.get()
            if isinstance(event, Received):
                yield event
            else:
                log_event(event, self.address.url)

    def publish(self, pub: Publication) -> asyncio.Future[None]:
        """Hand ``pub`` to paho; the future resolves when the broker acknowledges it.

        While offline paho keeps the message and sends it on reconnect. The future fails with
        ``PublishRefused`` when the outgoing queue is full or the broker refuses it (MQTT 5).
        """
        assert self._loop is not None, "start() first"
        future: asyncio.Future[None] = self._loop.create_future()
        info = self._client.publish(pub.topic, pub.payload, qos=pub.qos, retain=pub.retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            future.set_exception(
                PublishRefused(f"{self.options.max_queued_messages} messages already wait to be sent")
            )
        elif pub.qos == 0:
            future.set_result(None)  # nothing to wait for: paho acknowledges QoS 0 when written
        else:
            self._acks[info.mid] = future
        return future

    async def close(self, farewell: Publication | None = None, timeout_s: float = 5.0) -> None:
        """Publish ``farewell`` (waiting up to ``timeout_s`` for its acknowledgement), disconnect, stop."""
        if farewell is not None:
            try:
                await asyncio.wait_for(self.publish(farewell), timeout_s)
            except (asyncio.TimeoutError, PublishRefused) as e:
                log.warning(
                    "%s was not acknowledged before disconnecting: %s", farewell.topic, e or "timeout"
                )
        self._closing = True
        if self._connecting is not None:  # a connect on the executor finishes whatever we do
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._connecting), timeout_s)
        if self._client.disconnect() == MQTTErrorCode.MQTT_ERR_SUCCESS:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._down.wait(), timeout_s)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._forget_socket()
        sock = self._client.socket()
        if sock is not None:  # the broker did not take the DISCONNECT in time
            sock.close()
        for future in self._acks.values():
            future.cancel()
        self._acks.clear()

    # ---- connection upkeep (the event loop) ---------------------------------------------------

    async def _maintain(self) -> None:
        assert self._loop is not None
        failures = 0
        while not self._closing:
            self._session_accepted = False
            self._down.clear()
            self._aim()
            self._connecting = self._loop.run_in_executor(_connect_pool(), self._client.reconnect)
            try:
                await self._connecting
            except Exception as e:  # refused, unreachable, TLS: all retried the same way
                self._down.set()
                self._events.put_nowait(ConnectFailed(e, self.address))
                self._attempt_failed(f"cannot reach the MQTT broker at {self.address.url}: {_why(e)}")
            finally:
                self._connecting = None
            await self._down.wait()
            if self._closing:
                return
            failures = 0 if self._session_accepted else failures + 1
            self._fail_over()
            o = self.options
            delay = backoff_delay(max(failures - 1, 0), o.reconnect_min_s, o.reconnect_max_s)
            await asyncio.sleep(max(delay, self.hold_off_s))

    def _fail_over(self) -> None:
        """Aim the next attempt at another node, drawn at random: the clients of a dead node spread
        over the others instead of all landing on the next one in the list."""
        count = len(self.endpoint.addresses)
        if count > 1:
            self._node = (self._node + random.randrange(1, count)) % count

    def _aim(self) -> None:
        """Point the next attempt at the current node (paho keeps the host for reconnect and TLS)."""
        address, o = self.address, self.options
        if o.protocol == "mqttv5":
            properties = None
            if o.session_expiry_s:
                properties = Properties(PacketTypes.CONNECT)
                properties.SessionExpiryInterval = o.session_expiry_s
            self._client.connect_async(
                address.host,
                address.port,
                o.keepalive_s,
                clean_start=not o.session_expiry_s,
                properties=properties,
            )
        else:
            self._client.connect_async(address.host, address.port, o.keepalive_s)

    def _attempt_failed(self, error: str) -> None:
        """Count a failed attempt; once every node failed in a row, ``wait_up`` gives up with ``error``."""
        self._failures += 1
        if self._failures >= len(self.endpoint.addresses):
            self._resolve_waiters(error)

    def _resolve_waiters(self, error: str | None) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(error)

    def _session_ready(self, refused: tuple[tuple[str, ReasonCode], ...]) -> None:
        self.refused = refused
        if refused:
            what = ", ".join(f"{topic} ({reason})" for topic, reason in refused)
            self._attempt_failed(f"the MQTT broker at {self.address.url} refused the subscription to {what}")
            return
        self._failures = 0
        self._up.set()
        self._resolve_waiters(None)

    def _on_loop(self, callback: Callable[..., None], *args: Any) -> None:
        """Run ``callback`` now when on the loop's thread, else hand it to the loop."""
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            callback(*args)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the agent is shutting down
                self._loop.call_soon_threadsafe(callback, *args)

    def _watch(self, fd: int) -> None:
        assert self._loop is not None
        self._forget_socket()
        self._fd = fd
        self._loop.add_reader(fd, self._readable)
        self._misc = self._loop.call_later(self._misc_s * random.random(), self._tick)

    def _forget_socket(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
            self._misc = None
        if self._fd is not None and self._loop is not None:
            self._loop.remove_reader(self._fd)
            if self._writer_on:
                self._loop.remove_writer(self._fd)
        self._fd = None
        self._writer_on = False

    def _closed(self, fd: int) -> None:
        if fd == self._fd:
            self._forget_socket()
        self._down.set()

    def _want_write(self, fd: int, want: bool) -> None:
        if fd != self._fd or self._loop is None:
            return
        if want:
            if not self._writer_on and not self._flush_due:
                self._flush_due = True
                self._loop.call_soon(self._flush)
        elif self._writer_on:
            self._loop.remove_writer(fd)
            self._writer_on = False

    def _flush(self) -> None:
        """Write what paho queued; wait for the socket to become writable only if it is full."""
        self._flush_due = False
        if self._fd is None:
            return
        self._client.loop_write()
        if self._fd is not None and not self._writer_on and self._client.want_write():
            assert self._loop is not None
            self._loop.add_writer(self._fd, self._writable)
            self._writer_on = True

    def _readable(self) -> None:
        self._client.loop_read()
        sock = self._client.socket()
        pending = getattr(sock, "pending", None)
        if pending is not None and pending() > 0:  # TLS records already decrypted: no fd event comes
            assert self._loop is not None
            self._loop.call_soon(self._readable)

    def _writable(self) -> None:
        self._client.loop_write()

    def _tick(self) -> None:
        assert self._loop is not None
        self._misc = self._loop.call_later(self._misc_s, self._tick)
        self._client.loop_misc()

    # ---- paho's callbacks (the loop, except the socket ones during reconnect) ----------------

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._watch, sock.fileno())

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._closed, sock.fileno())

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._want_write, sock.fileno(), True)

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._want_write, sock.fileno(), False)

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:
            paho_log.error("%s", text)
        elif paho_log.isEnabledFor(logging.DEBUG):
            paho_log.debug("%s", text)

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        if self._will is not None:
            will = self._will()
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags, reason: ReasonCode, props: Any
    ) -> None:
        if not reason.is_failure:
            self._session_accepted = True
            if self._subscriptions:
                client.subscribe([(topic, self.options.subscribe_qos) for topic in self._subscriptions])
            if self._birth is not None:
                birth = self._birth()
                client.publish(birth.topic, birth.payload, qos=birth.qos, retain=birth.retain)
            if not self._subscriptions:
                self._on_loop(self._session_ready, ())
        else:
            why = f"the MQTT broker at {self.address.url} refused the connection: {reason}"
            self._on_loop(self._attempt_failed, why)
        self._events.put_nowait(Connected(reason, flags.session_present, self.address))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        props: Any,
    ) -> None:
        self._up.clear()
        by_broker = flags.is_disconnect_packet_from_server
        if by_broker and reason.value == SESSION_TAKEN_OVER:
            self.hold_off_s = max(self.hold_off_s, TAKEOVER_PAUSE_S)
        self._events.put_nowait(Disconnected(reason, by_broker))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._events.put_nowait(Received(message.topic, bytes(message.payload), bool(message.retain)))

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        results = tuple(zip(self._subscriptions, reasons, strict=False))
        self._session_ready(tuple((topic, reason) for topic, reason in results if reason.is_failure))
        self._events.put_nowait(Subscribed(results))

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        future = self._acks.pop(mid, None)
        if future is None or future.done():
            return
        if reason.is_failure:
            future.set_exception(PublishRefused(f"the broker answered {reason}"))
        else:
            future.set_result(None)
