"""Raw-request mode for entry scripts: ``@rawhttp``, ``ScoringRequest`` and ``ScoringResponse``.

A ``run()`` decorated with ``@rawhttp`` receives the whole HTTP request (method, path, headers,
query, body bytes) instead of the body as a string, and may return a ``ScoringResponse`` to choose
the status, headers and bytes of the answer. That is how scripts take binary input (images) or
answer CORS preflight requests. ``run()`` in any mode may also return a ``ScoringResponse``.

The attribute names follow Flask's request where Azure ML scripts use them (``args``, ``data``,
``get_data()``, ``get_json()``), so most raw Azure ML scripts run unchanged.

This module imports only the standard library and orjson: scripts import it at load time.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import orjson

RAW_ATTRIBUTE = "__scoring_rawhttp__"
_SERVER_HEADERS = frozenset({"content-type", "content-length", "transfer-encoding", "connection"})
"""Headers the server sets itself; a script's values for them are dropped (Content-Type is kept apart)."""

F = TypeVar("F", bound=Callable[..., Any])


def rawhttp(func: F) -> F:
    """Mark ``run()`` to receive a ``ScoringRequest`` (the raw HTTP request) as its argument."""
    setattr(func, RAW_ATTRIBUTE, True)
    return func


def is_raw(func: Callable[..., Any]) -> bool:
    """True when ``func`` was decorated with ``@rawhttp``."""
    return bool(getattr(func, RAW_ATTRIBUTE, False))


class ScoringRequest:
    """An HTTP request as a raw-mode ``run()`` sees it.

    ``headers`` is case-insensitive; ``query`` (alias ``args``) maps each parameter to its first
    value (``query.getall(name)`` gives every value).
    """

    __slots__ = ("body", "headers", "method", "path", "query", "query_string")

    def __init__(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        query: Mapping[str, str],
        body: bytes,
        query_string: str = "",
    ) -> None:
        self.method = method
        self.path = path
        self.headers = headers
        self.query = query
        self.body = body
        self.query_string = query_string

    @property
    def args(self) -> Mapping[str, str]:
        """The query parameters (Flask's name for ``query``)."""
        return self.query

    @property
    def data(self) -> bytes:
        """The body bytes (Flask's name for ``body``)."""
        return self.body

    @property
    def full_path(self) -> str:
        """Path and query string, e.g. ``/score?x=1``."""
        return f"{self.path}?{self.query_string}"

    @property
    def content_type(self) -> str:
        """The Content-Type header, or an empty string."""
        return self.headers.get("Content-Type", "")

    def get_data(self, as_text: bool = False) -> bytes | str:
        """The body, as bytes or (``as_text=True``) decoded as UTF-8."""
        return self.body.decode() if as_text else self.body

    def get_json(self) -> Any:
        """The body parsed as JSON; raises ``ValueError`` when it is not JSON."""
        return orjson.loads(self.body)

    @property
    def json(self) -> Any:
        """The body parsed as JSON (see ``get_json``)."""
        return self.get_json()

    def __repr__(self) -> str:
        return f"ScoringRequest({self.method} {self.path}, {len(self.body)} bytes)"


class ScoringResponse:
    """What ``run()`` may return to control the HTTP answer.

    ``body`` may be bytes (sent as is), a str (sent as UTF-8 text) or any other value (sent as
    JSON). ``headers`` may set ``Content-Type``; otherwise it follows from the body's type.
    ``Content-Length``, ``Transfer-Encoding`` and ``Connection`` are the server's to set.
    """

    __slots__ = ("body", "content_type", "headers", "status")

    def __init__(
        self,
        body: Any = b"",
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> None:
        if not 100 <= int(status) <= 599:
            raise ValueError(f"HTTP status {status} is not between 100 and 599")
        self.status = int(status)
        self.headers: dict[str, str] = dict(headers or {})
        if isinstance(body, bytes | bytearray | memoryview):
            self.body = bytes(body)
            default_type = "application/octet-stream"
        elif isinstance(body, str):
            self.body = body.encode()
            default_type = "text/plain; charset=utf-8"
        else:
            self.body = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
            default_type = "application/json"
        header_type = next((v for k, v in self.headers.items() if k.lower() == "content-type"), None)
        self.content_type = content_type or header_type or default_type
        self.headers = {k: v for k, v in self.headers.items() if k.lower() not in _SERVER_HEADERS}

    def __repr__(self) -> str:
        return f"ScoringResponse({self.status}, {self.content_type}, {len(self.body)} bytes)"
