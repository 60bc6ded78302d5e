"""Dashboard sessions: an operator token is exchanged once for a session cookie.

The cookie (``edge_session``) is HttpOnly, SameSite=Strict, ``Secure`` when the request came over
HTTPS (directly or as the proxy's ``X-Forwarded-Proto`` says), and holds only a random session id;
sessions live in the server's memory (a restart logs everyone out) and expire after
``SESSION_TTL_S`` without use. Each session has its own CSRF token, required on every POST (form
field ``csrf`` or header ``X-CSRF-Token``). The login form is protected the same way before a
session exists: ``GET /ui/login`` sets a short-lived ``edge_login`` nonce cookie and the form
carries an HMAC of it. The token itself travels only in the login form's POST body: never in a
URL, a cookie or a log line.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

SESSION_COOKIE = "edge_session"
LOGIN_COOKIE = "edge_login"
SESSION_TTL_S = 8 * 3600.0
LOGIN_TTL_S = 600
MAX_SESSIONS = 10_000


@dataclass
class Session:
    """One logged-in browser."""

    id: str
    csrf: str
    expires: float
    flash: list[tuple[str, str]] = field(default_factory=list)
    """``(kind, message)`` shown once on the next page (after a form's redirect)."""


class Sessions:
    """The server's sessions, in memory."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.secret = secrets.token_bytes(32)
        self._sessions: dict[str, Session] = {}

    def create(self) -> Session:
        """A new session (the oldest are dropped beyond ``MAX_SESSIONS``)."""
        self._expire()
        while len(self._sessions) >= MAX_SESSIONS:
            del self._sessions[next(iter(self._sessions))]
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), self.clock() + SESSION_TTL_S)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id (its lifetime extended), or None."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        now = self.clock()
        if session is None or session.expires <= now:
            self._sessions.pop(session_id or "", None)
            return None
        session.expires = now + SESSION_TTL_S
        return session

    def drop(self, session_id: str | None) -> None:
        """End a session (logout)."""
        self._sessions.pop(session_id or "", None)

    def login_csrf(self, nonce: str) -> str:
        """The login form's CSRF token for the ``edge_login`` nonce cookie."""
        return hmac.new(self.secret, nonce.encode(), hashlib.sha256).hexdigest()

    def _expire(self) -> None:
        now = self.clock()
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]


def same_token(given: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented CSRF token."""
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def is_https(request: web.Request) -> bool:
    """Whether the browser talks HTTPS to us (directly or through a TLS proxy)."""
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def set_cookie(
    response: web.StreamResponse, request: web.Request, name: str, value: str, max_age: int
) -> None:
    """An HttpOnly, SameSite=Strict cookie for the whole site."""
    response.set_cookie(
        name,
        value,
        max_age=max_age,
        path="/",
        httponly=True,
        samesite="Strict",
        secure=is_https(request),
    )
