"""The aiohttp application: routes from every ``routes_*`` module, middlewares, the OpenAPI document.

Middlewares, outermost first: a request id (the client's ``X-Request-Id`` when it is sane, else a
new one; echoed on every response), JSON errors (``{"error", "detail", "request_id"}``: 4xx for
client mistakes, 5xx only for failures of the server or what it depends on) and bearer-token
authentication (every route except the public ones).
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError
from pydantic_core import to_jsonable_python
from sqlalchemy import text

from cloud.api import routes_credentials, routes_deployments, routes_devices, routes_models, routes_packages
from cloud.api.auth import Tokens, bearer_token
from cloud.api.context import ControllerState, Services, services_key
from cloud.api.controller import controller_context
from cloud.api.errors import ApiError, invalid_body, message_of, status_of
from cloud.api.openapi import build_document
from cloud.api.routing import Route, call, reply, services

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-Id"
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
openapi_key = web.AppKey("openapi", dict)
tokens_key = web.AppKey("tokens", Tokens)
public_key = web.AppKey("public_paths", frozenset)
dashboard_key: web.AppKey[Callable[[str], bool]] = web.AppKey("dashboard_paths")
"""Whether a path is the dashboard's (it checks its own session cookie instead of a token)."""


def _version() -> str:
    try:
        return package_version("edgedeploy")
    except PackageNotFoundError:
        return "0.0.0"


class Health(BaseModel):
    """``GET /healthz``: the server answers and its database does too."""

    status: str
    version: str


class ServerStatus(BaseModel):
    """``GET /status``: the controller and what is owed to the broker."""

    broker: str
    pending_desired_states: int
    controller: ControllerState


def _ping(s: Services) -> None:
    with s.db.transaction() as session:
        session.execute(text("SELECT 1"))


async def healthz(request: web.Request) -> web.Response:
    """200 when the server and its database answer, 503 (JSON error) otherwise."""
    await call(_ping, services(request))
    return reply(Health(status="ok", version=_version()))


async def openapi_document(request: web.Request) -> web.Response:
    """This document."""
    return web.json_response(request.app[openapi_key])


async def server_status(request: web.Request) -> web.Response:
    """The background controller's state and how many desired states are not yet published."""
    s = services(request)
    pending = await call(s.fleet.pending_count)
    return reply(ServerStatus(broker=s.endpoint.url, pending_desired_states=pending, controller=s.controller))


SERVER_ROUTES = (
    Route(
        "GET",
        "/healthz",
        healthz,
        "Liveness and database check",
        "server",
        response=Health,
        public=True,
        errors=(503,),
    ),
    Route(
        "GET",
        "/openapi.json",
        openapi_document,
        "This OpenAPI document",
        "server",
        public=True,
        response=dict[str, Any],
    ),
    Route(
        "GET",
        "/status",
        server_status,
        "Controller state and pending desired states",
        "server",
        response=ServerStatus,
    ),
)
ALL_ROUTES: tuple[Route, ...] = (
    *SERVER_ROUTES,
    *routes_models.ROUTES,
    *routes_devices.ROUTES,
    *routes_deployments.ROUTES,
    *routes_packages.ROUTES,
    *routes_credentials.ROUTES,
)


def _error(
    request: web.Request, status: int, message: str, detail: Any = None, **headers: str
) -> web.Response:
    body = {
        "error": message,
        "detail": to_jsonable_python(detail),
        "request_id": request.get("request_id", ""),
    }
    return web.json_response(body, status=status, headers=headers or None)


@web.middleware
async def request_id_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Attach a request id to the request, its log lines and its response."""
    given = request.headers.get(REQUEST_ID_HEADER, "")
    request["request_id"] = given if _REQUEST_ID_RE.match(given) else uuid.uuid4().hex
    response: web.StreamResponse = await handler(request)
    response.headers[REQUEST_ID_HEADER] = request["request_id"]
    return response


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Answer every error as JSON with a fitting status."""
    try:
        return await handler(request)
    except ApiError as e:
        extra = {"WWW-Authenticate": 'Bearer realm="edgedeploy"'} if e.status == 401 else {}
        return _error(request, e.status, e.message, e.detail, **extra)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        extra = {"Allow": e.headers["Allow"]} if "Allow" in e.headers else {}
        message = (
            f"no route {request.method} {request.path}" if e.status == 404 else (e.text or e.reason).strip()
        )
        return _error(request, e.status, message, **extra)
    except ValidationError as e:
        err = invalid_body(e, "input")
        return _error(request, err.status, err.message, err.detail)
    except Exception as e:
        status = status_of(e)
        if status is None:
            log.exception(
                "request %s %s failed (request id %s)", request.method, request.path, request["request_id"]
            )
            return _error(request, 500, f"internal error: {type(e).__name__} (see the server log)")
        message, detail = message_of(e)
        if status >= 500:
            log.warning(
                "%s %s: %s (request id %s)", request.method, request.path, message, request["request_id"]
            )
        return _error(request, status, message, detail)


@web.middleware
async def auth_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """401 unless the request carries one of the operator tokens (public paths excepted)."""
    if request.path not in request.app[public_key] and not (request.app[dashboard_key](request.path)):
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            raise ApiError(401, "authentication required: send 'Authorization: Bearer <token>'")
        if not request.app[tokens_key].accepts(token):
            raise ApiError(401, "invalid token")
    return await handler(request)


def create_app(
    s: Services,
    tokens: Tokens,
    *,
    controller_interval_s: float | None = None,
    reports_queue: Sequence[str] = (),
    dashboard: bool = True,
) -> web.Application:
    """The API over ``s`` (closed when the app shuts down).

    With ``controller_interval_s`` the rollout controller runs as a background task too (taking
    reports from RabbitMQ's shared queue at ``reports_queue`` when given); with
    ``dashboard`` the operator dashboard is served under ``/ui/`` (session cookies, not tokens).
    """
    app = web.Application(middlewares=[request_id_middleware, error_middleware, auth_middleware])
    app[services_key] = s
    app[tokens_key] = tokens
    app[public_key] = frozenset(r.path for r in ALL_ROUTES if r.public)
    app[dashboard_key] = lambda _path: False
    app[openapi_key] = build_document(ALL_ROUTES, title="edgedeploy operator API", version=_version())
    for route in ALL_ROUTES:
        app.router.add_route(route.method, route.path, route.handler, name=route.operation_id)
    app.cleanup_ctx.append(routes_packages.package_jobs_context)
    if controller_interval_s is not None:
        app.cleanup_ctx.append(controller_context(controller_interval_s, reports_queue))
    if dashboard:
        # Imported here: the dashboard uses the API's helpers (routing, errors, services).
        from cloud.dashboard.routes import is_dashboard_path, setup

        app[dashboard_key] = is_dashboard_path
        setup(app, tokens)

    async def close(_app: web.Application) -> None:
        await call(s.close)

    app.on_cleanup.append(close)
    return app
