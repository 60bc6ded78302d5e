"""What every dashboard handler shares: the session check, CSRF, security headers, HTML errors.

``handler(kind)`` wraps a handler: it finds the session (a page without one redirects to the login
form, an API-ish endpoint answers 401), checks the CSRF token and the ``Origin`` of every POST,
turns store errors into an HTML page (or JSON for ``kind="json"``) with the status the REST API
would use, and puts the security headers on every answer: a Content-Security-Policy that allows
scripts, styles and connections only from this server (no inline script, no inline style, no
frames), ``nosniff``, referrers only to this server (with ``no-referrer`` browsers send ``Origin: null`` on
form posts, which the origin check would refuse), and ``no-store`` so pages with fleet data are not cached.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Literal
from urllib.parse import urlsplit

import jinja2
from aiohttp import web

from cloud.api.errors import ApiError, message_of, status_of
from cloud.dashboard.session import SESSION_COOKIE, Session, Sessions, same_token
from cloud.dashboard.watch import Watcher, watcher_key

log = logging.getLogger(__name__)

PREFIX = "/ui"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}

env_key = web.AppKey("dashboard_templates", jinja2.Environment)
sessions_key = web.AppKey("dashboard_sessions", Sessions)

Kind = Literal["page", "json", "stream"]
Handler = Callable[[web.Request, Session], Awaitable[web.StreamResponse]]


def secure(response: web.StreamResponse) -> web.StreamResponse:
    """Put the security headers on ``response`` (before it is prepared; ``routes.py`` does it for
    every answer under the dashboard's paths, static files and errors included)."""
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def render(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    """A page from ``template`` with the common context (session, CSRF token, path)."""
    env = request.app[env_key]
    session: Session | None = request.get("session")
    flash = list(session.flash) if session else []
    if session:
        session.flash.clear()
    context = {
        "title": "edgedeploy",
        "events": "",
        "csrf": session.csrf if session else "",
        "logged_in": session is not None,
        "path": request.path,
        "flash": flash,
        **context,
    }
    html = env.get_template(template).render(**context)
    return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")


def watcher(request: web.Request) -> Watcher:
    """The app's store watcher."""
    return request.app[watcher_key]


def redirect(location: str) -> web.HTTPSeeOther:
    """A 303 to a path of this dashboard (never to another site)."""
    if not location.startswith(PREFIX + "/") or location.startswith("//"):
        location = PREFIX + "/"
    return web.HTTPSeeOther(location, headers=SECURITY_HEADERS)


def same_origin(request: web.Request) -> bool:
    """Whether a POST comes from a page of this server (``Origin``, else ``Referer``; one must be sent)."""
    source = request.headers.get("Origin") or request.headers.get("Referer")
    if not source or source == "null":
        return False
    return urlsplit(source).netloc == request.host


async def check_csrf(request: web.Request, expected: str) -> None:
    """403 unless the POST carries ``expected`` (form field ``csrf`` or ``X-CSRF-Token``) from our origin."""
    given = request.headers.get("X-CSRF-Token")
    if given is None and request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        given = str((await request.post()).get("csrf", ""))
    if not same_origin(request):
        raise ApiError(403, "cross-origin form posts are refused")
    if not same_token(given, expected):
        raise ApiError(403, "missing or wrong CSRF token: reload the page and try again")


def _error(request: web.Request, kind: Kind, status: int, message: str) -> web.Response:
    if kind == "page":
        return render(
            request, "error.html", status=status, title=f"Error {status}", status_code=status, message=message
        )
    return web.json_response({"error": message}, status=status)


def handler(
    kind: Kind = "page",
) -> Callable[[Handler], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """Wrap a dashboard handler; see the module docstring."""

    def wrap(fn: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        @functools.wraps(fn)
        async def run(request: web.Request) -> web.StreamResponse:
            session = request.app[sessions_key].get(request.cookies.get(SESSION_COOKIE))
            if session is None:
                if kind == "page" and request.method == "GET":
                    raise redirect(f"{PREFIX}/login")
                return _error(request, kind, 401, "not logged in (or the session expired): log in again")
            request["session"] = session
            try:
                if request.method == "POST":
                    await check_csrf(request, session.csrf)
                response = await fn(request, session)
            except web.HTTPException as e:
                if e.status < 400:
                    raise
                return _error(request, kind, e.status, e.text or e.reason)
            except ApiError as e:
                return _error(request, kind, e.status, e.message)
            except Exception as e:
                status = status_of(e)
                if status is None:
                    log.exception("dashboard %s %s failed", request.method, request.path)
                    return _error(request, kind, 500, f"internal error: {type(e).__name__}")
                return _error(request, kind, status, message_of(e)[0])
            return response

        return run

    return wrap
