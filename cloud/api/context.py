"""The operations one API process serves: registry, devices and fleet over one shared database.

These are the objects the ``edgectl`` commands use; the API calls the same methods on them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from cloud.config import Settings
from cloud.devices import DeviceManager
from cloud.fleet.controller import Status as ControllerState
from cloud.fleet.service import Fleet
from cloud.keys import load_or_create_signing_key
from cloud.store.blobs import BlobStore
from cloud.store.db import Database, open_database
from cloud.store.registry import Registry
from edgemqtt.endpoint import Endpoint
from modules.profiles import load_profiles

DEFAULT_UPLOAD_MAX = 4 * 1024**3
"""Largest model upload accepted (bytes) unless ``edgectl serve --max-upload`` says otherwise."""
UPLOADS_DIR = "uploads"


@dataclass
class Services:
    """Open operations plus the API's own settings."""

    settings: Settings
    db: Database
    registry: Registry
    devices: DeviceManager
    fleet: Fleet
    endpoint: Endpoint
    """The broker desired states are published to and commands go through."""
    upload_max: int = DEFAULT_UPLOAD_MAX
    controller: ControllerState = field(default_factory=ControllerState)
    background: set[asyncio.Future[Any]] = field(default_factory=set)
    """Work started by a request that outlives it (continuous deployment after a register)."""

    @classmethod
    def open(
        cls, settings: Settings, endpoint: Endpoint, *, upload_max: int = DEFAULT_UPLOAD_MAX
    ) -> Services:
        """Open the database, the blob store, the signing key and the device profiles of ``settings``."""
        db = open_database(settings.db_url)
        try:
            fleet = Fleet(db, load_or_create_signing_key(settings.data_dir), load_profiles())
            return cls(
                settings=settings,
                db=db,
                registry=Registry(db, BlobStore(settings.blob_dir)),
                devices=DeviceManager(settings, db),
                fleet=fleet,
                endpoint=endpoint,
                upload_max=upload_max,
            )
        except BaseException:
            db.dispose()
            raise

    @property
    def upload_dir(self) -> Path:
        """Where uploads are spooled before they are registered (same file system as the blobs)."""
        return self.settings.data_dir / UPLOADS_DIR

    def close(self) -> None:
        """Release the database connections."""
        self.db.dispose()


services_key = web.AppKey("services", Services)
