"""The one place where paho-mqtt's network thread meets asyncio.

``MqttBridge`` runs one paho client (callback API v2) on paho's own thread (``loop_start``), which
connects, retries with paho's capped exponential back-off (also when the very first connection
fails: ``connect_async``) and keeps QoS 1 messages in flight across reconnects.

The paho callbacks touch no asyncio object. Each one hands a plain event (``Connected``,
``ConnectFailed``, ``Disconnected``, ``Received``, ``Subscribed``) or a publish acknowledgement to
the event loop with ``loop.call_soon_threadsafe`` and nothing else. Two things happen on paho's
thread on purpose, because they must happen on every connection before anything else:
``on_pre_connect`` re-arms the last will, and ``on_connect`` subscribes and publishes the birth
message, so a reconnect always resubscribes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import BrokerConfig

log = logging.getLogger(__name__)
paho_log = logging.getLogger(f"{__name__}.paho")


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


@dataclass(frozen=True)
class ConnectFailed:
    """No MQTT connection could be opened (refused, unreachable, TLS handshake); paho retries."""

    error: BaseException | None


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


class PublishRefused(Exception):
    """The broker (or paho's full outgoing queue) refused a publication."""


class MqttBridge:
    """A paho client on its own thread whose callbacks arrive on the asyncio loop as events.

    ``will`` and ``birth`` build the last will and the message published on every connect; they
    are called on paho's thread, so they must only build bytes. Call ``start`` on the loop, read
    events with ``next_event``, publish with ``publish`` (a future resolved by the broker's
    acknowledgement) and end with ``close``.
    """

    def __init__(
        self,
        broker: BrokerConfig,
        *,
        client_id: str,
        username: str | None,
        password: str | None,
        subscriptions: list[str],
        will: Callable[[], Publication],
        birth: Callable[[], Publication],
    ) -> None:
        self._broker = broker
        self._subscriptions = list(subscriptions)
        self._will = will
        self._birth = birth
        self._loop: asyncio.AbstractEventLoop | None = None
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._acks: dict[int, asyncio.Future[None]] = {}
        v5 = broker.protocol == "mqttv5"
        options: dict[str, Any] = {} if v5 else {"clean_session": True}
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5 if v5 else MQTTProtocolVersion.MQTTv311,
            **options,
        )
        client = self._client
        client.on_log = self._on_log
        client.suppress_exceptions = True
        client.reconnect_delay_set(broker.reconnect_min_s, broker.reconnect_max_s)
        client.max_queued_messages_set(broker.max_queued_messages)
        if username is not None:
            client.username_pw_set(username, password)
        if broker.tls:
            self._set_tls()
        client.on_pre_connect = self._on_pre_connect
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish

    def _set_tls(self) -> None:
        b = self._broker
        try:
            self._client.tls_set(
                ca_certs=str(b.ca_file) if b.ca_file else None,
                certfile=str(b.client_cert) if b.client_cert else None,
                keyfile=str(b.client_key) if b.client_key else None,
                cert_reqs=ssl.CERT_REQUIRED,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except (OSError, ssl.SSLError) as e:
            files = ", ".join(str(p) for p in (b.ca_file, b.client_cert, b.client_key) if p)
            raise ValueError(f"cannot load the broker's TLS files ({files or 'system CAs'}): {e}") from e

    def start(self) -> None:
        """Begin connecting in the background (call on the event loop); never raises for a down broker."""
        self._loop = asyncio.get_running_loop()
        if self._broker.protocol == "mqttv5":
            self._client.connect_async(
                self._broker.host, self._broker.port, self._broker.keepalive_s, clean_start=True
            )
        else:
            self._client.connect_async(self._broker.host, self._broker.port, self._broker.keepalive_s)
        self._client.loop_start()

    async def next_event(self) -> Event:
        """The next connection event or message, in the order paho saw them."""
        return await self._events.get()

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
                PublishRefused(f"{self._broker.max_queued_messages} messages already wait to be sent")
            )
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
        self._client.disconnect()
        await asyncio.to_thread(self._client.loop_stop)
        for future in self._acks.values():
            future.cancel()
        self._acks.clear()

    # ---- paho's thread ------------------------------------------------------------------------

    def _post(self, callback: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):  # the loop is closed: the agent is shutting down
            self._loop.call_soon_threadsafe(callback, *args)

    def _on_log(self, client: mqtt.Client, userdata: Any, level: int, text: str) -> None:
        # paho reports exceptions raised in callbacks as errors; "Client is not connected" is
        # also an error to paho but only means its loop ran once more after a disconnect.
        if level == mqtt.MQTT_LOG_ERR and not text.startswith("Client is not connected"):
            paho_log.error("%s", text)
        else:
            paho_log.debug("%s", text)

    def _on_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        will = self._will()
        client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags, reason: ReasonCode, props: Any
    ) -> None:
        if not reason.is_failure:
            client.subscribe([(topic, 1) for topic in self._subscriptions])
            birth = self._birth()
            client.publish(birth.topic, birth.payload, qos=birth.qos, retain=birth.retain)
        self._post(self._events.put_nowait, Connected(reason, flags.session_present))

    def _on_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this inside its ``except OSError`` block: the error is the one being handled.
        self._post(self._events.put_nowait, ConnectFailed(sys.exc_info()[1]))

    def _on_disconnect(
        self,
        client: mqtt.Client,
        userdata: Any,
        flags: mqtt.DisconnectFlags,
        reason: ReasonCode,
        props: Any,
    ) -> None:
        self._post(self._events.put_nowait, Disconnected(reason, flags.is_disconnect_packet_from_server))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._post(
            self._events.put_nowait, Received(message.topic, bytes(message.payload), bool(message.retain))
        )

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode], props: Any
    ) -> None:
        results = tuple(zip(self._subscriptions, reasons, strict=False))
        self._post(self._events.put_nowait, Subscribed(results))

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: ReasonCode, props: Any
    ) -> None:
        self._post(self._acknowledged, mid, reason)

    # ---- the event loop -----------------------------------------------------------------------

    def _acknowledged(self, mid: int, reason: ReasonCode) -> None:
        future = self._acks.pop(mid, None)
        if future is None or future.done():
            return
        if reason.is_failure:
            future.set_exception(PublishRefused(f"the broker answered {reason}"))
        else:
            future.set_result(None)
