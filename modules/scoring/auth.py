"""Bearer-key authentication for the scoring routes (``/score``, ``/v2/models/*/infer``).

When ``SCORING_KEY`` is set, those routes need ``Authorization: Bearer <key>``; health, metadata,
metrics and the OpenAPI document stay open so probes and tooling work without the key.
"""

from __future__ import annotations

import hmac


class KeyCheck:
    """Compares the Authorization header with the configured key in constant time."""

    __slots__ = ("_expected",)

    def __init__(self, key: str) -> None:
        if not key:
            raise ValueError("the scoring key must not be empty")
        self._expected = key.encode()

    def allows(self, authorization: str | None) -> bool:
        """True when ``authorization`` (the header value, or None) carries the right key."""
        if not authorization:
            return False
        scheme, _, token = authorization.strip().partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), self._expected)

    @staticmethod
    def problem(authorization: str | None) -> str:
        """Why a request was refused, without echoing the key it sent."""
        if not authorization:
            return "missing Authorization header: send 'Authorization: Bearer <key>'"
        if not authorization.lower().startswith("bearer "):
            return "the Authorization header must use the Bearer scheme: 'Authorization: Bearer <key>'"
        return "wrong key in the Authorization header"
