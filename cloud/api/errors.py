"""How the API reports errors: ``{"error": "...", "detail": ..., "request_id": "..."}`` with a status.

``ApiError`` is raised by handlers for problems of the request itself (bad query, wrong content
type, oversize upload). ``status_of`` maps the operations' own exceptions (store, fleet, device
commands, documents) to HTTP statuses, so a client mistake is never a 500.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError

from cloud.broker import BrokerError
from cloud.fleet.commands import CommandError, CommandTimeout, DeviceOffline
from cloud.keys import KeyFileError
from cloud.packaging.errors import InputError, PackagingError
from cloud.store.errors import (
    DiskFullError,
    InUseError,
    InvalidInputError,
    NotFoundError,
    ReadOnlyError,
    SchemaError,
    StoreError,
)
from edgemqtt.endpoint import BrokerUnavailable
from modules.documents import DocumentError


class ApiError(Exception):
    """An error answered as JSON with ``status``; ``detail`` is any JSON value (or None)."""

    def __init__(self, status: int, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail


class ConflictError(ApiError):
    """409: the request clashes with the current state (duplicate, in use, device offline)."""

    def __init__(self, message: str, detail: Any = None) -> None:
        super().__init__(409, message, detail)


# Most specific first: the first matching class decides the status.
_STATUS: tuple[tuple[type[Exception], int], ...] = (
    (NotFoundError, 404),
    (InUseError, 409),
    (DeviceOffline, 409),
    (DocumentError, 400),
    (InvalidInputError, 400),
    (DiskFullError, 507),
    (ReadOnlyError, 503),
    (SchemaError, 503),
    (StoreError, 500),
    (BrokerUnavailable, 503),
    (CommandTimeout, 504),
    (CommandError, 502),
    (KeyFileError, 500),
    (BrokerError, 500),
    (SQLAlchemyError, 503),
    (InputError, 400),
    (PackagingError, 502),
)


def status_of(exc: Exception) -> int | None:
    """The HTTP status for an operation's exception, or None when it is not one we expect."""
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return None


def message_of(exc: Exception) -> tuple[str, Any]:
    """``(error, detail)`` for an operation's exception: the first line, and every line when several."""
    if isinstance(exc, SQLAlchemyError):
        lines = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return f"database error: {lines[0] if lines else type(exc).__name__}", None
    lines = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    if len(lines) == 1:
        return lines[0], None
    return f"{lines[0]} (and {len(lines) - 1} more)", lines


def validation_detail(err: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[dict[str, str]]:
    """One ``{"loc": "a.b.0", "msg": ...}`` per problem of a pydantic error (locations dotted)."""
    return [
        {
            "loc": ".".join(str(p) for p in (*prefix, *e["loc"])) or "(body)",
            "msg": e["msg"].removeprefix("Value error, "),
        }
        for e in err.errors()
    ]


def invalid_body(err: ValidationError, what: str = "request body") -> ApiError:
    """400 naming the first bad field; ``detail`` lists every problem with its field path."""
    detail = validation_detail(err)
    first = detail[0]
    more = f" (and {len(detail) - 1} more)" if len(detail) > 1 else ""
    return ApiError(400, f"invalid {what}: {first['loc']}: {first['msg']}{more}", detail)
