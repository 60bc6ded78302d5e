"""ORM tables of provisioned devices, and the queries the fleet uses to pick them.

``devices``: one row per device (its id is also its MQTT username), its device profile and the
Mosquitto ``$7$`` hash of its MQTT password (never the password). ``device_tags``: ``key=value``
labels that deployment targets select on.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, String, exists, select
from sqlalchemy.orm import Mapped, Session, mapped_column, relationship, selectinload

from cloud.store.models import NAME_LEN, Base
from modules.contract import utcnow

HASH_LEN = 256
TAG_VALUE_LEN = 256


class Device(Base):
    """A provisioned device."""

    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    profile: Mapped[str] = mapped_column(String(NAME_LEN), index=True)
    password_hash: Mapped[str] = mapped_column(String(HASH_LEN))
    rabbitmq_password_hash: Mapped[str | None] = mapped_column(String(HASH_LEN), nullable=True)
    """The same password in RabbitMQ's format (``cloud.broker_rabbitmq``); None: added before it existed."""
    sealing_public_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """X25519 public key (base64) registry credentials are sealed to; None: added before they existed."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    tags: Mapped[list[DeviceTag]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="DeviceTag.key"
    )

    @property
    def tag_dict(self) -> dict[str, str]:
        """The tags as a dict, sorted by key."""
        return {t.key: t.value for t in self.tags}


class DeviceTag(Base):
    """A ``key=value`` tag of a device."""

    __tablename__ = "device_tags"

    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True)
    key: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    value: Mapped[str] = mapped_column(String(TAG_VALUE_LEN), index=True)


def find_devices(
    session: Session,
    *,
    ids: Iterable[str] | None = None,
    tags: Mapping[str, str] | None = None,
    profiles: Iterable[str] | None = None,
) -> list[Device]:
    """Devices matching every given criterion (each id listed, all tags, any profile), by id."""
    query = select(Device).options(selectinload(Device.tags)).order_by(Device.id)
    if ids is not None:
        query = query.where(Device.id.in_(list(ids)))
    if profiles is not None:
        query = query.where(Device.profile.in_(list(profiles)))
    for key, value in (tags or {}).items():
        query = query.where(
            exists().where(DeviceTag.device_id == Device.id, DeviceTag.key == key, DeviceTag.value == value)
        )
    return list(session.scalars(query))


def rabbitmq_password_hashes(session: Session) -> dict[str, str | None]:
    """``{device id: RabbitMQ hash}`` of every device (None for devices added before there was one)."""
    rows = session.execute(select(Device.id, Device.rabbitmq_password_hash))
    return {row.id: row.rabbitmq_password_hash for row in rows}


def password_hashes(session: Session) -> dict[str, str]:
    """``{device id: $7$ hash}`` of every device, for the broker's password file."""
    return {row.id: row.password_hash for row in session.execute(select(Device.id, Device.password_hash))}
