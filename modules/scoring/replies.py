"""What scoring work hands back to the HTTP layer: a ``Reply``, or a ``ClientError`` for bad input.

Scoring work (parse, run, serialise) happens in a worker thread and produces plain bytes, so the
event loop only moves bytes in and out.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

JSON = "application/json"
_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS

# Media types a JSON route accepts. A missing Content-Type is accepted like Azure ML does, and so is
# curl -d's default (form-urlencoded) and text/plain, because clients send JSON with them too.
_JSON_COMPATIBLE = frozenset({"", JSON, "text/plain", "application/x-www-form-urlencoded"})


@dataclass(frozen=True, slots=True)
class Reply:
    """A finished HTTP answer."""

    body: bytes
    status: int = 200
    content_type: str = JSON
    headers: Mapping[str, str] | None = None


class ClientError(Exception):
    """The request is wrong; ``status`` is the 4xx code, ``message`` says what and where."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def dumps(obj: Any) -> bytes:
    """Serialise to JSON bytes (numpy arrays and scalars natively)."""
    return orjson.dumps(obj, default=_default, option=_DUMPS_OPTIONS)


def json_reply(obj: Any, status: int = 200) -> Reply:
    """A JSON reply."""
    return Reply(dumps(obj), status)


def media_type(content_type: str | None) -> str:
    """The bare media type of a Content-Type header value, lower-case ('' when missing)."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


def require_json_content_type(content_type: str | None) -> None:
    """Raise a 415 ``ClientError`` unless the Content-Type can carry JSON."""
    kind = media_type(content_type)
    if kind in _JSON_COMPATIBLE or kind.endswith("+json"):
        return
    raise ClientError(415, f"unsupported Content-Type {kind!r}: send the body as application/json")


def parse_json(body: bytes) -> Any:
    """Parse a JSON request body; raise a 400 ``ClientError`` saying where it is malformed."""
    if not body:
        raise ClientError(400, "the request body is empty: send a JSON document")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ClientError(400, f"the request body is not valid JSON: {exc}") from None
