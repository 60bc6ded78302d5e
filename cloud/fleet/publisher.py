"""Publish signed desired states: retained, QoS 1, many in flight, and report which were acknowledged.

``publish_desired`` connects and keeps a window of ``WINDOW`` unacknowledged messages in
flight itself (paho's own in-flight limit rescans every pending message on each PUBACK, which
is quadratic for large fleets, so it is switched off), waits for the PUBACKs and returns the
messages the broker acknowledged. Whatever was not acknowledged stays marked unpublished in the store and is
sent again by the next ``publish_pending`` (``edgectl deploy publish``, ``deploy watch``, or any
later apply), so a broker that is down at apply time loses nothing.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTProtocolVersion

from cloud.fleet.mqtt import CONNECT_TIMEOUT_S, KEEPALIVE_S, BrokerUnavailable, Endpoint, new_client

WINDOW = 1000
ACK_TIMEOUT_S = 30.0


def desired_topic(device_id: str) -> str:
    """``edge/{d}/desired``."""
    return f"edge/{device_id}/desired"


@dataclass(frozen=True)
class Outgoing:
    """One desired state to publish."""

    device_id: str
    generation: int
    payload: bytes


@dataclass(frozen=True)
class PublishOutcome:
    """Which messages the broker acknowledged, and why the others were not."""

    acknowledged: list[Outgoing]
    error: str | None = None


def publish_desired(
    endpoint: Endpoint, messages: Sequence[Outgoing], *, timeout_s: float = ACK_TIMEOUT_S
) -> PublishOutcome:
    """Publish ``messages`` retained with QoS 1; returns those acknowledged (never raises for the broker).

    Runs paho's network loop in the calling thread (no background thread): PUBACKs are read in
    between publishes, so sending and acknowledging overlap without threads taking turns.
    Publishing stops at the first message paho cannot send (the connection dropped).
    """
    if not messages:
        return PublishOutcome([])
    client = new_client(endpoint, "edgectl-publish", MQTTProtocolVersion.MQTTv311)
    client.max_inflight_messages_set(0)  # unlimited in paho: the window below bounds it
    try:
        _connect(client, endpoint)
    except BrokerUnavailable as e:
        return PublishOutcome([], str(e))
    acked = [0]
    client.on_publish = lambda *_: acked.__setitem__(0, acked[0] + 1)
    deadline = time.monotonic() + timeout_s
    infos: list[tuple[Outgoing, mqtt.MQTTMessageInfo]] = []
    try:
        while time.monotonic() < deadline:
            while len(infos) < len(messages) and len(infos) - acked[0] < WINDOW:
                m = messages[len(infos)]
                infos.append((m, client.publish(desired_topic(m.device_id), m.payload, qos=1, retain=True)))
                if infos[-1][1].rc != mqtt.MQTT_ERR_SUCCESS:
                    break
            if acked[0] >= len(messages) or infos[-1][1].rc != mqtt.MQTT_ERR_SUCCESS:
                break
            window_full = len(infos) == len(messages) or len(infos) - acked[0] >= WINDOW
            if client.loop(0.05 if window_full else 0) != mqtt.MQTT_ERR_SUCCESS:
                break
        acknowledged = [m for m, info in infos if info.is_published()]
    finally:
        client.disconnect()
    error = None
    if len(acknowledged) < len(messages):
        error = (
            f"the MQTT broker at {endpoint.url} acknowledged {len(acknowledged)} of {len(messages)} "
            "desired states"
        )
    return PublishOutcome(acknowledged, error)


def _connect(client: mqtt.Client, endpoint: Endpoint) -> None:
    """Connect without a network thread; BrokerUnavailable when refused, unreachable or silent."""
    refused: list[str] = []
    answered = [False]

    def on_connect(_c: mqtt.Client, _u: object, _f: object, reason: mqtt.ReasonCode, _p: object) -> None:
        answered[0] = True
        if reason.is_failure:
            refused.append(str(reason))

    client.on_connect = on_connect
    try:
        client.connect(endpoint.host, endpoint.port, keepalive=KEEPALIVE_S)
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not answered[0] and time.monotonic() < deadline:
            if client.loop(0.1) != mqtt.MQTT_ERR_SUCCESS:
                break
    except (OSError, ssl.SSLError) as e:
        raise BrokerUnavailable(
            f"cannot reach the MQTT broker at {endpoint.url}: {e.strerror or e}"
        ) from None
    if refused:
        raise BrokerUnavailable(f"the MQTT broker at {endpoint.url} refused the connection: {refused[0]}")
    if not answered[0]:
        raise BrokerUnavailable(
            f"the MQTT broker at {endpoint.url} did not answer within {CONNECT_TIMEOUT_S:.0f} s"
        )
