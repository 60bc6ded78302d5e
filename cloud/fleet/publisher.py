"""Publish signed desired states: retained, QoS 1, many in flight, and report which were acknowledged.

``publish_desired`` connects, hands every message to paho at once (a window of
``MAX_INFLIGHT`` unacknowledged messages), waits for the PUBACKs and returns the messages the
broker acknowledged. Whatever was not acknowledged stays marked unpublished in the store and is
sent again by the next ``publish_pending`` (``edgectl deploy publish``, ``deploy watch``, or any
later apply), so a broker that is down at apply time loses nothing.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from cloud.fleet.mqtt import BrokerUnavailable, Endpoint, connect, disconnect, new_client

MAX_INFLIGHT = 2000
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
    """Publish ``messages`` retained with QoS 1; returns those acknowledged (never raises for the broker)."""
    if not messages:
        return PublishOutcome([])
    client = new_client(endpoint, "edgectl-publish")
    client.max_inflight_messages_set(MAX_INFLIGHT)
    client.max_queued_messages_set(0)
    try:
        connect(client, endpoint)
    except BrokerUnavailable as e:
        return PublishOutcome([], str(e))
    try:
        infos = [
            (m, client.publish(desired_topic(m.device_id), m.payload, qos=1, retain=True)) for m in messages
        ]
        deadline = time.monotonic() + timeout_s
        for _, info in infos:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if info.rc == mqtt.MQTT_ERR_SUCCESS or info.rc == mqtt.MQTT_ERR_NO_CONN:
                _wait(info, remaining)
        acked = [m for m, info in infos if info.is_published()]
    finally:
        disconnect(client)
    missing = len(messages) - len(acked)
    error = (
        None
        if not missing
        else f"the MQTT broker at {endpoint.url} acknowledged {len(acked)} of {len(messages)} desired states"
    )
    return PublishOutcome(acked, error)


def _wait(info: mqtt.MQTTMessageInfo, timeout_s: float) -> None:
    try:
        info.wait_for_publish(timeout_s)
    except (RuntimeError, ValueError):
        return
