"""Commands to one device (``logs``, ``restart``, ``ping``) over ``edge/{d}/cmd/req|res/{id}``.

``run_command`` refuses at once when the store says the device is offline (its last will was
the latest ``online`` message), naming since when. Otherwise it subscribes to the response
topic, publishes the request (QoS 1, not retained) and waits for the answer up to a timeout.
"""

from __future__ import annotations

import threading
import uuid
from datetime import datetime

import paho.mqtt.client as mqtt
from pydantic import ValidationError

from cloud.fleet.mqtt import Endpoint, connect, disconnect, new_client
from cloud.fleet.sql import aware
from cloud.store.db import Database
from cloud.store.devices import Device
from cloud.store.errors import NotFoundError
from cloud.store.fleet import OnlineRecord
from modules.contract import CommandName, CommandRequest, CommandResponse, format_validation_error

DEFAULT_TIMEOUT_S = 15.0


class CommandError(Exception):
    """A command could not be carried out; the message says why."""


class DeviceOffline(CommandError):
    """The device's last ``online`` message says it is offline; nothing was sent."""


class CommandTimeout(CommandError):
    """The device (or the broker) did not answer in time."""


def _when(dt: datetime) -> str:
    return dt.isoformat(timespec="seconds").replace("+00:00", "Z")


def run_command(
    db: Database,
    endpoint: Endpoint,
    device_id: str,
    command: CommandName,
    *,
    module: str | None = None,
    tail: int = 100,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> CommandResponse:
    """Send one command and wait for its response; see the module docstring for the errors."""
    with db.transaction() as s:
        if s.get(Device, device_id) is None:
            raise NotFoundError(f"device {device_id!r} is not provisioned (see: edgectl device list)")
        online = s.get(OnlineRecord, device_id)
        state = (online.online, aware(online.since)) if online is not None else None
    if state is not None and not state[0]:
        raise DeviceOffline(f"device {device_id} is offline since {_when(state[1])}; {command} was not sent")
    request = CommandRequest(id=uuid.uuid4().hex[:16], command=command, module=module, tail=tail)
    res_topic = f"edge/{device_id}/cmd/res/{request.id}"
    subscribed = threading.Event()
    answered = threading.Event()
    answer: list[bytes] = []

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        if message.topic == res_topic and not answer:
            answer.append(bytes(message.payload))
            answered.set()

    client = new_client(endpoint, "edgectl-cmd")
    client.on_message = on_message
    client.on_subscribe = lambda *_: subscribed.set()
    connect(client, endpoint, on_connected=lambda c: c.subscribe(res_topic, qos=1))
    try:
        if not subscribed.wait(timeout_s):
            raise CommandTimeout(f"the MQTT broker at {endpoint.url} did not acknowledge the subscription")
        client.publish(
            f"edge/{device_id}/cmd/req/{request.id}", request.model_dump_json().encode(), qos=1, retain=False
        )
        if not answered.wait(timeout_s):
            seen = (
                f"it reported online since {_when(state[1])}"
                if state is not None
                else "it never reported being online"
            )
            raise CommandTimeout(
                f"device {device_id} did not answer {command} within {timeout_s:g} s ({seen})"
            )
    finally:
        disconnect(client)
    try:
        response = CommandResponse.model_validate_json(answer[0])
    except ValidationError as e:
        raise CommandError(
            f"device {device_id} answered {command} with a malformed response: {format_validation_error(e)}"
        ) from None
    return response
