"""Errors raised by the store; each message is one line that names what was wrong."""

from __future__ import annotations


class StoreError(Exception):
    """Base of every error the store raises on purpose."""


class InvalidInputError(StoreError):
    """The caller's input is wrong: a bad name, a missing file, an empty folder."""


class AlreadyExistsError(InvalidInputError):
    """Something with that name or id already exists."""


class NotFoundError(StoreError):
    """A model or version that does not exist."""


class InUseError(StoreError):
    """A model version that a deployment still uses cannot be deleted."""


class DiskFullError(StoreError):
    """The blob store ran out of space; nothing was registered."""


class CorruptBlobError(StoreError):
    """A stored blob is missing or its bytes no longer match its hash."""


class SchemaError(StoreError):
    """The database holds a schema this code does not understand, or cannot be reached."""


class ReadOnlyError(StoreError):
    """The data directory is full or read-only: the state can be read but not changed."""
