"""What operators do from the dashboard: tail a module's log, restart it, act on a rollout.

These call the operations the REST API calls (``send_command`` over the command topics; the
fleet's resume, retry, rollback and delete) and answer a form with a redirect back to the page
and a one-time message saying what happened (or why not). Log lines come back as JSON and the
page puts them in with ``textContent``: a device's log is never parsed as HTML.
"""

from __future__ import annotations

import logging

from aiohttp import web

from cloud.api.errors import ApiError, message_of, status_of
from cloud.api.routing import call, query_int, services
from cloud.dashboard.session import Session
from cloud.dashboard.web import PREFIX, handler, redirect
from cloud.fleet.commands import send_command
from modules.contract import CommandName

log = logging.getLogger(__name__)

LOG_TAIL = 200
MAX_LOG_TAIL = 2000
COMMAND_TIMEOUT_S = 10.0
DEPLOYMENT_ACTIONS = ("resume", "retry", "revert", "delete")


def _explain(e: Exception) -> str:
    if status_of(e) is None:
        log.exception("dashboard action failed")
        return f"unexpected {type(e).__name__} (see the server log)"
    return message_of(e)[0]


async def _command(request: web.Request, command: CommandName, tail: int = LOG_TAIL) -> tuple[bool, str]:
    s = services(request)
    device_id, module = request.match_info["id"], request.match_info["module"]
    try:
        response = await send_command(
            s.fleet.db,
            s.endpoint,
            device_id,
            command,
            module=module,
            tail=tail,
            timeout_s=COMMAND_TIMEOUT_S,
        )
    except Exception as e:
        return False, _explain(e)
    if not response.ok:
        return False, f"device {device_id}: {response.error or 'command failed'}"
    return True, response.output


@handler("json")
async def module_logs(request: web.Request, _session: Session) -> web.StreamResponse:
    """``{"ok", "lines", "error"}``: the last lines of a module's log, asked of the device."""
    tail = query_int(request, "tail", LOG_TAIL, 1, MAX_LOG_TAIL)
    ok, text = await _command(request, "logs", tail)
    if not ok:
        return web.json_response({"ok": False, "lines": [], "error": text}, status=502)
    return web.json_response({"ok": True, "lines": text.splitlines(), "error": None})


@handler("page")
async def restart_module(request: web.Request, session: Session) -> web.StreamResponse:
    """Restart a module on its device, then back to the device page."""
    device_id, module = request.match_info["id"], request.match_info["module"]
    ok, text = await _command(request, "restart")
    log.info("dashboard: restart %s/%s: %s", device_id, module, "ok" if ok else "failed")
    session.flash.append(("ok" if ok else "bad", text if ok else f"restart of {module} failed: {text}"))
    raise redirect(f"{PREFIX}/devices/{device_id}")


@handler("page")
async def deployment_action(request: web.Request, session: Session) -> web.StreamResponse:
    """Resume, retry, revert (to the revision before) or delete a deployment."""
    s = services(request)
    name, action = request.match_info["name"], request.match_info["action"]
    if action not in DEPLOYMENT_ACTIONS:
        raise ApiError(404, f"no deployment action {action!r} (known: {', '.join(DEPLOYMENT_ACTIONS)})")
    back = f"{PREFIX}/deployments/{name}"
    try:
        if action in ("resume", "retry"):
            what, new, report = await call(s.fleet.resume, name, retry=action == "retry", endpoint=s.endpoint)
            message = (
                f"{what}; {new} new desired state(s), {report.published} published, {report.pending} pending"
            )
        elif action == "revert":
            number, target = await call(s.fleet.revision, name, None)
            result = await call(
                s.fleet.apply,
                target,
                endpoint=s.endpoint,
                source=f"rollback to revision {number} (dashboard)",
            )
            message = f"reverted to revision {number}: {result.new_generations} new desired state(s)"
        else:
            changed, report = await call(s.fleet.delete, name, endpoint=s.endpoint)
            message = f"deleted {name}: {changed} device(s) get a new desired state"
            back = f"{PREFIX}/deployments"
        session.flash.append(("ok", message))
        log.info("dashboard: deployment %s %s: %s", name, action, message)
    except Exception as e:
        session.flash.append(("bad", f"{action} {name}: {_explain(e)}"))
    raise redirect(back)
