"""The dashboard's routes and its wiring into the aiohttp app of ``edgectl serve``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from cloud.api.auth import Tokens
from cloud.dashboard import actions, events, login, pages
from cloud.dashboard.render import environment
from cloud.dashboard.session import Sessions
from cloud.dashboard.watch import watcher_context
from cloud.dashboard.web import PREFIX, env_key, redirect, secure, sessions_key

STATIC_DIR = Path(__file__).parent / "static"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_dashboard_path(path: str) -> bool:
    """Whether ``path`` is the dashboard's (session cookie, not bearer token)."""
    return path == "/" or path == PREFIX or path.startswith(PREFIX + "/")


async def _root(_request: web.Request) -> web.StreamResponse:
    raise redirect(f"{PREFIX}/")


ROUTES: tuple[tuple[str, str, Handler, str], ...] = (
    ("GET", "/", _root, "root"),
    ("GET", PREFIX, _root, "prefix"),
    ("GET", f"{PREFIX}/login", login.login_form, "login_form"),
    ("POST", f"{PREFIX}/login", login.login, "login"),
    ("POST", f"{PREFIX}/logout", login.logout, "logout"),
    ("GET", f"{PREFIX}/", pages.overview_page, "overview"),
    ("GET", f"{PREFIX}/devices", pages.devices_page, "devices"),
    ("GET", f"{PREFIX}/devices/{{id}}", pages.device_page_view, "device"),
    ("GET", f"{PREFIX}/devices/{{id}}/modules/{{module}}/logs", actions.module_logs, "logs"),
    ("POST", f"{PREFIX}/devices/{{id}}/modules/{{module}}/restart", actions.restart_module, "restart"),
    ("GET", f"{PREFIX}/deployments", pages.deployments_page, "deployments"),
    ("GET", f"{PREFIX}/deployments/{{name}}", pages.deployment_page, "deployment"),
    ("POST", f"{PREFIX}/deployments/{{name}}/{{action}}", actions.deployment_action, "deployment_action"),
    ("GET", f"{PREFIX}/models", pages.models_page, "models"),
    ("GET", f"{PREFIX}/events", events.events, "events"),
)
"""``(method, path, handler, name)``; each route is named ``dashboard_<name>``."""


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    if is_dashboard_path(request.path):
        secure(response)


def setup(app: web.Application, tokens: Tokens) -> None:
    """Add the dashboard's routes, templates, sessions and store watcher to ``app``."""
    app[env_key] = environment()
    app[sessions_key] = Sessions()
    app[events.shared_key] = events.SharedRegions()
    app[login.tokens_key] = tokens
    app.cleanup_ctx.append(watcher_context)
    app.on_response_prepare.append(_security_headers)
    for method, path, fn, name in ROUTES:
        app.router.add_route(method, path, fn, name=f"dashboard_{name}")
    app.router.add_static(f"{PREFIX}/static", STATIC_DIR, name="dashboard_static", append_version=True)
