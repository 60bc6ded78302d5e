"""Commands to one device (``logs``, ``restart``, ``ping``) over ``edge/{d}/cmd/req|res/{id}``.

``send_command`` refuses at once when the store says the device is offline (its last will was
the latest ``online`` message), naming since when. Otherwise it opens an ``edgemqtt.Session``
subscribed to the response topic, publishes the request (QoS 1, not retained) once the broker
acknowledged the subscription, and waits for the answer up to a timeout. ``run_command`` is the
same for callers without an event loop (the CLI, worker threads).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import datetime

from pydantic import ValidationError

from cloud.fleet.sql import aware
from cloud.store.db import Database
from cloud.store.devices import Device
from cloud.store.errors import NotFoundError
from cloud.store.fleet import OnlineRecord
from edgemqtt import topics
from edgemqtt.endpoint import Endpoint
from edgemqtt.session import Publication, Received, Session, SessionOptions
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


def _online_state(db: Database, device_id: str) -> tuple[bool, datetime] | None:
    with db.transaction() as s:
        if s.get(Device, device_id) is None:
            raise NotFoundError(f"device {device_id!r} is not provisioned (see: edgectl device list)")
        online = s.get(OnlineRecord, device_id)
        return (online.online, aware(online.since)) if online is not None else None


async def send_command(
    db: Database,
    endpoint: Endpoint,
    device_id: str,
    command: CommandName,
    *,
    module: str | None = None,
    tail: int = 100,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> CommandResponse:
    """Send one command and wait for its response; see the module docstring for the errors.

    ``BrokerUnavailable`` when the broker cannot be reached or refuses the connection.
    """
    state = await asyncio.to_thread(_online_state, db, device_id)
    if state is not None and not state[0]:
        raise DeviceOffline(f"device {device_id} is offline since {_when(state[1])}; {command} was not sent")
    request = CommandRequest(id=uuid.uuid4().hex[:16], command=command, module=module, tail=tail)
    mqtt = Session(
        endpoint,
        client_id=f"edgectl-cmd-{request.id}",
        subscriptions=[topics.command_response(device_id, request.id)],
        options=SessionOptions(reconnect_max_s=2),
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s  # connecting and the answer share the caller's timeout
    mqtt.start()
    try:
        await mqtt.wait_up(timeout_s)
        mqtt.publish(
            Publication(topics.command_request(device_id, request.id), request.model_dump_json().encode())
        )
        try:
            answer = await asyncio.wait_for(_first_message(mqtt), max(0.0, deadline - loop.time()))
        except asyncio.TimeoutError:
            seen = (
                f"it reported online since {_when(state[1])}"
                if state is not None
                else "it never reported being online"
            )
            raise CommandTimeout(
                f"device {device_id} did not answer {command} within {timeout_s:g} s ({seen})"
            ) from None
    finally:
        with contextlib.suppress(Exception):
            await mqtt.close()
    try:
        return CommandResponse.model_validate_json(answer.payload)
    except ValidationError as e:
        raise CommandError(
            f"device {device_id} answered {command} with a malformed response: {format_validation_error(e)}"
        ) from None


async def _first_message(mqtt: Session) -> Received:
    async for message in mqtt.messages():
        return message
    raise AssertionError("messages() never ends")


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
    """``send_command`` on an event loop of its own, for callers that have none (CLI, worker threads)."""
    return asyncio.run(
        send_command(db, endpoint, device_id, command, module=module, tail=tail, timeout_s=timeout_s)
    )
