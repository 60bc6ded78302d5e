"""The cloud's registry credentials: named, revisioned, and never shown once stored.

``registry_credentials``: one row per credential an operator set (``edgectl credential set``):
the registry it is for, the username, the password (encrypted with a key derived from the cloud's
signing key, which is not in the database: ``cloud/fleet/credentials.py``), and a revision that
every change moves on.
Desired states carry only the password sealed to each device (``cloud/fleet/sealer.py``); the
password itself leaves this table only to be sealed, or for the cloud's own pulls at packaging.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from cloud.store.models import NAME_LEN, Base
from modules.contract import utcnow


class RegistryCredential(Base):
    """A registry credential set by an operator."""

    __tablename__ = "registry_credentials"

    name: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    registry_host: Mapped[str] = mapped_column(String(255))
    username: Mapped[str] = mapped_column(String(255))
    password: Mapped[str] = mapped_column(Text)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
