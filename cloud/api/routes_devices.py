"""``/devices``: provision, list, show, tag and remove devices; logs and restarts of their modules.

Adding or removing a device rewrites the broker's password and ACL files and reloads the broker
when ``edgectl broker config`` recorded its pid file, exactly as ``edgectl device add|remove`` do.
"""

from __future__ import annotations

from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from cloud.api.errors import ApiError, ConflictError
from cloud.api.routing import (
    Body,
    Param,
    Route,
    call,
    json_body,
    query_int,
    query_number,
    query_tags,
    reply,
    services,
)
from cloud.broker import BrokerError
from cloud.devices import (
    AGENT_CONFIG_FILE,
    DEFAULT_PROFILE,
    DEFAULT_STATE_DIR,
    AgentBundle,
    DeviceManager,
    DeviceView,
    Provisioned,
    check_device_id,
    reload_if_configured,
)
from cloud.fleet.commands import DEFAULT_TIMEOUT_S, send_command
from cloud.store.errors import AlreadyExistsError
from edgemqtt.endpoint import Endpoint
from modules.contract import CommandName, CommandResponse

MAX_TAIL = 10000
MAX_COMMAND_TIMEOUT_S = 120.0


class NewDevice(BaseModel):
    """``POST /devices``: what ``edgectl device add`` takes (the configuration goes to the data dir)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="device id, also its MQTT username: lowercase letters, digits, -_.")
    profile: str = DEFAULT_PROFILE
    tags: dict[str, str] = Field(default_factory=dict)
    broker_url: str | None = Field(default=None, description="default: the URL broker config recorded")
    runtime: Literal["docker", "process"] = "docker"
    state_dir: str = DEFAULT_STATE_DIR
    force: bool = Field(default=False, description="overwrite an existing agent.yaml")
    show_password: bool = Field(default=False, description="return the MQTT password (shown once)")


class TagChange(BaseModel):
    """``PATCH /devices/{id}``: tags to set and tags to remove."""

    model_config = ConfigDict(extra="forbid")

    set: dict[str, str] = Field(default_factory=dict)
    remove: list[str] = Field(default_factory=list)


class RemovedDevice(BaseModel):
    """What ``edgectl device remove --json`` prints."""

    removed: DeviceView
    broker: str
    retained_cleared: list[str]
    retained_pending: list[str]
    error: str | None = None


def _reload_note(manager: DeviceManager) -> str:
    try:
        return reload_if_configured(manager.paths)
    except BrokerError as e:
        return f"broker files updated, but the broker was not reloaded: {e}"


def _add(manager: DeviceManager, body: NewDevice) -> Provisioned:
    bundle = AgentBundle(
        broker_url=body.broker_url, state_dir=body.state_dir, runtime=body.runtime, force=body.force
    )
    try:
        result = manager.add(body.id, profile=body.profile, tags=body.tags, bundle=bundle)
    except AlreadyExistsError as e:
        raise ConflictError(str(e)) from e
    shown = result if body.show_password else result.without_password()
    return shown.model_copy(update={"broker": _reload_note(manager)})


def _remove(manager: DeviceManager, device_id: str, endpoint: Endpoint) -> RemovedDevice:
    view = manager.remove(device_id)
    note = _reload_note(manager)
    cleared = manager.clear_removed(endpoint)
    return RemovedDevice(
        removed=view,
        broker=note,
        retained_cleared=cleared.cleared,
        retained_pending=cleared.pending,
        error=cleared.error,
    )


async def add_device(request: web.Request) -> web.Response:
    """Provision a device: credentials, broker files, agent configuration."""
    body = await json_body(request, NewDevice)
    result = await call(_add, services(request).devices, body)
    return reply(result, 201, {"Location": f"/devices/{result.device.id}"})


async def list_devices(request: web.Request) -> web.Response:
    """Devices with all given tags and one of the given profiles."""
    profiles = request.query.getall("profile", []) or None
    manager = services(request).devices
    return reply(await call(manager.list_devices, tags=query_tags(request), profiles=profiles))


async def show_device(request: web.Request) -> web.Response:
    """One device."""
    return reply(await call(services(request).devices.show, request.match_info["id"]))


async def tag_device(request: web.Request) -> web.Response:
    """Set and remove a device's tags."""
    body = await json_body(request, TagChange)
    manager = services(request).devices
    return reply(await call(manager.tag, request.match_info["id"], body.set, body.remove))


async def remove_device(request: web.Request) -> web.Response:
    """Remove a device and its credentials."""
    s = services(request)
    return reply(await call(_remove, s.devices, request.match_info["id"], s.endpoint))


async def device_agent_config(request: web.Request) -> web.Response:
    """The device's ``agent.yaml`` (it holds the MQTT password) as ``add`` wrote it."""
    manager = services(request).devices
    device_id = check_device_id(request.match_info["id"])
    await call(manager.show, device_id)
    path = manager.default_bundle_dir(device_id) / AGENT_CONFIG_FILE
    try:
        text = await call(path.read_text, encoding="utf-8")
    except FileNotFoundError:
        raise ApiError(404, f"device {device_id!r} has no agent configuration at {path}") from None
    return web.Response(text=text, content_type="application/yaml")


async def _command(request: web.Request, command: CommandName, tail: int = 100) -> web.Response:
    s = services(request)
    timeout = query_number(request, "timeout", DEFAULT_TIMEOUT_S, 0.1, MAX_COMMAND_TIMEOUT_S)
    response = await send_command(
        s.fleet.db,
        s.endpoint,
        request.match_info["id"],
        command,
        module=request.match_info["module"],
        tail=tail,
        timeout_s=timeout,
    )
    if not response.ok:
        raise ApiError(
            502,
            f"device {request.match_info['id']}: {response.error or 'command failed'}",
            response.model_dump(mode="json"),
        )
    return reply(response)


async def module_logs(request: web.Request) -> web.Response:
    """The last lines of a module's log, asked of the device over MQTT."""
    tail = query_int(request, "tail", 100, 1, MAX_TAIL)
    return await _command(request, "logs", tail)


async def restart_module(request: web.Request) -> web.Response:
    """Restart one module on a device (over MQTT)."""
    return await _command(request, "restart")


_TIMEOUT = Param(
    "timeout",
    f"seconds to wait for the device's answer (default {DEFAULT_TIMEOUT_S:g})",
    {"type": "number", "minimum": 0.1, "maximum": MAX_COMMAND_TIMEOUT_S},
)
_COMMAND_ERRORS = (400, 404, 409, 502, 503, 504)

ROUTES = (
    Route(
        "GET",
        "/devices",
        list_devices,
        "List devices",
        "devices",
        response=list[DeviceView],
        query=(
            Param("tag", "KEY=VALUE; repeatable", {"type": "string"}, repeated=True),
            Param("profile", "device profile; repeatable", {"type": "string"}, repeated=True),
        ),
        errors=(400,),
    ),
    Route(
        "POST",
        "/devices",
        add_device,
        "Provision a device",
        "devices",
        response=Provisioned,
        status=201,
        body=Body({"application/json": {"schema": NewDevice}}),
        errors=(400, 409, 415),
        description="Creates the device's MQTT password (only its hash is stored), rewrites the broker's "
        "password and ACL files and writes the agent configuration into the data directory.",
    ),
    Route(
        "GET",
        "/devices/{id}",
        show_device,
        "Show a device",
        "devices",
        response=DeviceView,
        errors=(400, 404),
    ),
    Route(
        "PATCH",
        "/devices/{id}",
        tag_device,
        "Set and remove a device's tags",
        "devices",
        response=DeviceView,
        body=Body({"application/json": {"schema": TagChange}}),
        errors=(400, 404, 415),
    ),
    Route(
        "DELETE",
        "/devices/{id}",
        remove_device,
        "Remove a device and its credentials",
        "devices",
        response=RemovedDevice,
        errors=(400, 404),
    ),
    Route(
        "GET",
        "/devices/{id}/agent-config",
        device_agent_config,
        "Download the device's agent.yaml (holds its MQTT password)",
        "devices",
        response_media="application/yaml",
        errors=(400, 404),
    ),
    Route(
        "GET",
        "/devices/{id}/modules/{module}/logs",
        module_logs,
        "The last lines of a module's log (asked over MQTT)",
        "devices",
        response=CommandResponse,
        query=(
            Param("tail", f"number of lines, 1-{MAX_TAIL} (default 100)", {"type": "integer"}),
            _TIMEOUT,
        ),
        errors=_COMMAND_ERRORS,
    ),
    Route(
        "POST",
        "/devices/{id}/modules/{module}/restart",
        restart_module,
        "Restart a module on a device (over MQTT)",
        "devices",
        response=CommandResponse,
        query=(_TIMEOUT,),
        errors=_COMMAND_ERRORS,
    ),
)
