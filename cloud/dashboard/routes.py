"""The dashboard's routes and its wiring into the aiohttp app of ``edgectl serve``."""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from cloud.api.auth import Tokens
from cloud.dashboard import actions, events, login, pages
from cloud.dashboard.render import environment
from cloud.dashboard.session import Sessions
from cloud.dashboard.watch import watcher_context
from cloud.dashboard.web import PREFIX, env_key, redirect, secure, sessions_key

STATIC_DIR = Path(__file__).parent / "static"


def is_dashboard_path(path: str) -> bool:
    """Whether ``path`` is the dashboard's (session cookie, not bearer token)."""
    return path == "/" or path == PREFIX or path.startswith(PREFIX + "/")


async def _root(_request: web.Request) -> web.StreamResponse:
    raise redirect(f"{PREFIX}/")


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
    r = app.router
    r.add_get("/", _root, name="dashboard_root")
    r.add_get(PREFIX, _root, name="dashboard_prefix")
    r.add_get(f"{PREFIX}/login", login.login_form, name="dashboard_login_form")
    r.add_post(f"{PREFIX}/login", login.login, name="dashboard_login")
    r.add_post(f"{PREFIX}/logout", login.logout, name="dashboard_logout")
    r.add_get(f"{PREFIX}/", pages.overview_page, name="dashboard_overview")
    r.add_get(f"{PREFIX}/devices", pages.devices_page, name="dashboard_devices")
    r.add_get(f"{PREFIX}/devices/{{id}}", pages.device_page_view, name="dashboard_device")
    r.add_get(f"{PREFIX}/devices/{{id}}/modules/{{module}}/logs", actions.module_logs, name="dashboard_logs")
    r.add_post(
        f"{PREFIX}/devices/{{id}}/modules/{{module}}/restart",
        actions.restart_module,
        name="dashboard_restart",
    )
    r.add_get(f"{PREFIX}/deployments", pages.deployments_page, name="dashboard_deployments")
    r.add_get(f"{PREFIX}/deployments/{{name}}", pages.deployment_page, name="dashboard_deployment")
    r.add_post(
        f"{PREFIX}/deployments/{{name}}/{{action}}",
        actions.deployment_action,
        name="dashboard_deployment_action",
    )
    r.add_get(f"{PREFIX}/models", pages.models_page, name="dashboard_models")
    r.add_get(f"{PREFIX}/events", events.events, name="dashboard_events")
    r.add_static(f"{PREFIX}/static", STATIC_DIR, name="dashboard_static", append_version=True)
