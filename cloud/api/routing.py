"""The route table shared by the router and the OpenAPI document, and the helpers handlers use.

Each ``routes_*.py`` module exports ``ROUTES``: ``Route`` values carrying the handler and what the
OpenAPI document says about it (summary, parameters, request body, response type, error statuses),
so the document is generated from the same table the server routes by and cannot drift from it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python

from cloud.api.context import Services, services_key
from cloud.api.errors import ApiError, invalid_body
from cloud.store.registry import check_tags

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")
B = TypeVar("B", bound=BaseModel)

JSON_BODY_MAX = 1024 * 1024
"""Largest JSON or YAML request body (a manifest); larger ones are answered 413."""


@dataclass(frozen=True)
class Param:
    """A query parameter as the OpenAPI document describes it."""

    name: str
    description: str
    schema: Mapping[str, Any]
    required: bool = False
    repeated: bool = False


@dataclass(frozen=True)
class Body:
    """A request body: its media types and, for JSON, the pydantic type it validates into."""

    content: Mapping[str, Mapping[str, Any]]
    """media type → OpenAPI media-type object; ``{"schema": TYPE}`` entries are expanded."""
    description: str = ""
    required: bool = True


@dataclass(frozen=True)
class Route:
    """One operation: method, path (aiohttp syntax), handler and its documentation."""

    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
    path: str
    handler: Handler
    summary: str
    tag: str
    response: Any = None
    """The type the 2xx body validates as (pydantic model, dataclass, list of them), or None."""
    status: int = 200
    also: tuple[int, ...] = ()
    """Other success statuses with the same body (200 for an apply that updated)."""
    response_media: str = "application/json"
    query: tuple[Param, ...] = ()
    body: Body | None = None
    errors: tuple[int, ...] = ()
    public: bool = False
    """Served without a token (health, the OpenAPI document)."""
    description: str = ""

    @property
    def operation_id(self) -> str:
        """The handler's name: unique across the table."""
        return self.handler.__name__

    @property
    def openapi_path(self) -> str:
        """The path with aiohttp's ``{name:regex}`` turned into ``{name}``."""
        return re.sub(r"\{(\w+):[^}]+\}", r"{\1}", self.path)

    @property
    def path_params(self) -> list[str]:
        """Names of the path's parameters, in order."""
        return re.findall(r"\{(\w+)(?::[^}]+)?\}", self.path)


def services(request: web.Request) -> Services:
    """The operations the app was built with."""
    return request.app[services_key]


async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking operation (database, files, MQTT round trip) off the event loop."""
    return await asyncio.to_thread(fn, *args, **kwargs)


def reply(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON response from pydantic models, dataclasses, lists and dicts of them."""
    return web.json_response(to_jsonable_python(data), status=status, headers=headers)


def query_tags(request: web.Request, name: str = "tag") -> dict[str, str]:
    """Repeated ``tag=KEY=VALUE`` query parameters as a dict; 400 naming a malformed or repeated key."""
    out: dict[str, str] = {}
    for item in request.query.getall(name, []):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ApiError(400, f"query parameter {name}={item!r}: expected KEY=VALUE")
        if key in out:
            raise ApiError(400, f"query parameter {name}: key {key!r} given twice")
        out[key] = value
    return check_tags(out)


def query_bool(request: web.Request, name: str, default: bool = False) -> bool:
    """``true``/``false`` (also 1/0, yes/no) query parameter; 400 on anything else."""
    raw = request.query.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise ApiError(400, f"query parameter {name}={raw!r}: expected true or false")


def query_number(request: web.Request, name: str, default: float, low: float, high: float) -> float:
    """A number query parameter within ``[low, high]``; 400 naming it otherwise."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(400, f"query parameter {name}={raw!r}: expected a number") from None
    if not low <= value <= high:
        raise ApiError(400, f"query parameter {name}={raw!r}: expected a number from {low:g} to {high:g}")
    return value


def query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    """An integer query parameter within ``[low, high]``; 400 naming it otherwise."""
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.strip().isdigit() or not low <= int(raw) <= high:
        raise ApiError(400, f"query parameter {name}={raw!r}: expected a whole number from {low} to {high}")
    return int(raw)


def version_param(request: web.Request) -> int | None:
    """The ``{version}`` path parameter: a number from 1, or ``latest`` (None)."""
    raw = request.match_info["version"]
    if raw == "latest":
        return None
    if raw.isdigit() and int(raw) >= 1:
        return int(raw)
    raise ApiError(400, f"version {raw!r}: expected a number from 1 or 'latest'")


def require_media(request: web.Request, allowed: tuple[str, ...]) -> str:
    """The request's media type if it is one of ``allowed``; 415 naming the accepted ones otherwise."""
    media = request.content_type
    if media not in allowed:
        raise ApiError(
            415, f"unsupported content type {media!r}: send {' or '.join(allowed)}", {"accepted": allowed}
        )
    return media


async def read_text(request: web.Request, limit: int = JSON_BODY_MAX) -> str:
    """The whole body as UTF-8 text, at most ``limit`` bytes (413 beyond, 400 when not UTF-8)."""
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"request body of {request.content_length} bytes is over the limit of {limit}")
    data = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > limit:
            raise ApiError(413, f"request body is over the limit of {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"request body is not UTF-8 text (byte {e.start})") from None


async def json_body(request: web.Request, model: type[B]) -> B:
    """The JSON body validated into ``model``: 415 when not JSON, 400 with field paths when invalid."""
    require_media(request, ("application/json",))
    text = await read_text(request)
    try:
        return model.model_validate_json(text or "null")
    except ValidationError as e:
        raise invalid_body(e) from None
