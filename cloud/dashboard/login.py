"""``/ui/login`` and ``/ui/logout``: the operator token for a session cookie, and back.

A wrong token is answered after ``FAILED_LOGIN_DELAY_S`` (guessing is slow) and logged with the
client address only: the token presented is never logged, put in a URL or echoed in the page.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from aiohttp import web

from cloud.api.auth import Tokens
from cloud.dashboard.session import (
    LOGIN_COOKIE,
    LOGIN_TTL_S,
    SESSION_COOKIE,
    SESSION_TTL_S,
    Session,
    same_token,
    set_cookie,
)
from cloud.dashboard.web import PREFIX, handler, redirect, render, same_origin, sessions_key

log = logging.getLogger(__name__)

FAILED_LOGIN_DELAY_S = 0.5
MAX_TOKEN_FIELD = 4096
tokens_key = web.AppKey("dashboard_tokens", Tokens)


def _form(request: web.Request, status: int = 200, error: str = "") -> web.Response:
    sessions = request.app[sessions_key]
    nonce = secrets.token_urlsafe(24)
    response = render(
        request,
        "login.html",
        status=status,
        title="Log in",
        login_csrf=sessions.login_csrf(nonce),
        error=error,
    )
    set_cookie(response, request, LOGIN_COOKIE, nonce, LOGIN_TTL_S)
    return response


async def login_form(request: web.Request) -> web.StreamResponse:
    """The login form (straight to the overview when already logged in)."""
    if request.app[sessions_key].get(request.cookies.get(SESSION_COOKIE)) is not None:
        raise redirect(f"{PREFIX}/")
    return _form(request)


async def login(request: web.Request) -> web.StreamResponse:
    """Check the token of the form; on success a new session cookie and a redirect to the overview."""
    sessions = request.app[sessions_key]
    if request.content_type != "application/x-www-form-urlencoded":
        return _form(request, 415, "send the login form")
    form = await request.post()
    nonce = request.cookies.get(LOGIN_COOKIE, "")
    expected = sessions.login_csrf(nonce) if nonce else ""
    given = str(form.get("csrf", ""))
    if not same_origin(request) or not nonce or not same_token(given, expected):
        return _form(request, 403, "the login form expired or came from elsewhere: try again")
    token = str(form.get("token", "")).strip()[:MAX_TOKEN_FIELD]
    if not token or not request.app[tokens_key].accepts(token):
        log.warning("dashboard: failed login from %s", request.remote)
        await asyncio.sleep(FAILED_LOGIN_DELAY_S)
        return _form(request, 401, "that token is not one of this server's operator tokens")
    session = sessions.create()
    log.info("dashboard: login from %s", request.remote)
    response = redirect(f"{PREFIX}/")
    set_cookie(response, request, SESSION_COOKIE, session.id, int(SESSION_TTL_S))
    response.del_cookie(LOGIN_COOKIE, path="/")
    raise response


@handler("page")
async def logout(request: web.Request, session: Session) -> web.StreamResponse:
    """End the session and forget its cookie."""
    request.app[sessions_key].drop(session.id)
    response = redirect(f"{PREFIX}/login")
    response.del_cookie(SESSION_COOKIE, path="/")
    raise response
