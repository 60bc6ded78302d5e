"""Packaging errors: each carries one line that says what was wrong and where.

The ``edgectl`` commands print ``str(error)`` and exit non-zero; nothing here needs a traceback.
"""

from __future__ import annotations

import errno


class PackagingError(Exception):
    """A packaging step failed; the message is one line meant for the operator."""

    exit_code = 1


class InputError(PackagingError):
    """The operator's input is unusable: missing model files, unknown profile, bad entry script."""

    exit_code = 2


class BaseImageUnavailable(PackagingError):
    """A profile's base image cannot be built here and was not provided (vendor runtimes)."""


class RegistryError(PackagingError):
    """The OCI registry is down, refuses a request or answers something unexpected."""


class EngineError(PackagingError):
    """Docker Engine is not reachable or failed an operation."""


class SmokeTestError(PackagingError):
    """The freshly built module did not start, or its model did not load."""

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


class DiskFullError(PackagingError):
    """A disk filled up while writing; names the place and what was needed."""


def os_error(exc: OSError, what: str) -> PackagingError:
    """Turn an OSError met while doing ``what`` into a one-line PackagingError."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left on device while {what}: free some space and retry")
    reason = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    return PackagingError(f"{what} failed: {reason}{where}")
