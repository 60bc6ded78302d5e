"""Cloud state: the model registry (and, later, deployments and devices) in SQLite or PostgreSQL."""

from cloud.store.errors import (
    CorruptBlobError,
    DiskFullError,
    InUseError,
    InvalidInputError,
    NotFoundError,
    ReadOnlyError,
    SchemaError,
    StoreError,
)
from cloud.store.registry import Registry

__all__ = [
    "CorruptBlobError",
    "DiskFullError",
    "InUseError",
    "InvalidInputError",
    "NotFoundError",
    "ReadOnlyError",
    "Registry",
    "SchemaError",
    "StoreError",
]
