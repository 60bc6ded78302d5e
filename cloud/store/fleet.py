"""ORM tables of the fleet: what each device must run, what it reports, and rollout progress.

- ``device_desired``: the last desired state computed for each device (its generation, the hash
  of its content and the signed JSON payload) and whether the broker acknowledged it. Rows with
  ``published = false`` are the publishes still owed (the broker was down at apply time).
- ``device_reported`` / ``device_online``: the latest ``ReportedState`` and ``OnlineStatus`` each
  device sent, written in batches by the ingester.
- ``rollouts`` / ``rollout_devices``: per deployment revision, the waves its devices were split
  into, which devices were released, and what each device ran before (for a revert).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from cloud.store.models import NAME_LEN, SHA256_LEN, Base
from modules.contract import utcnow

STATUS_LEN = 16


class DesiredRecord(Base):
    """The current desired state of one device, signed, and whether it reached the broker."""

    __tablename__ = "device_desired"

    device_id: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer)
    content_hash: Mapped[str] = mapped_column(String(SHA256_LEN))
    deployment: Mapped[str | None] = mapped_column(String(NAME_LEN), nullable=True, index=True)
    payload: Mapped[str] = mapped_column(Text, doc="the signed DesiredState as JSON")
    published: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), nullable=True, doc="when the signed payload expires"
    )


class ReportedRecord(Base):
    """The newest ReportedState of one device (``payload`` holds it whole)."""

    __tablename__ = "device_reported"

    device_id: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    generation_applied: Mapped[int] = mapped_column(Integer)
    generation_received: Mapped[int | None] = mapped_column(Integer, nullable=True)
    deployment_status: Mapped[str] = mapped_column(String(STATUS_LEN))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    payload: Mapped[str] = mapped_column(Text)
    reported_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    heartbeat_s: Mapped[float | None] = mapped_column(Float, nullable=True, doc="the agent's heartbeat")


class OnlineRecord(Base):
    """Whether a device's MQTT session is up, and since when (from ``edge/{d}/online``).

    ``ordering`` decides which message wins: the agent's session number doubled, plus one for
    offline (the will and farewell of a connection come after its birth); messages of agents that
    send no session number are ordered by their timestamp in microseconds the same way.
    """

    __tablename__ = "device_online"

    device_id: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    online: Mapped[bool] = mapped_column(Boolean)
    since: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    session: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    instance: Mapped[str | None] = mapped_column(String(64), nullable=True)
    ordering: Mapped[int] = mapped_column(BigInteger, default=0)


class RolloutRecord(Base):
    """The rollout of one deployment revision: ``rolling``, ``complete``, ``halted`` or ``reverted``."""

    __tablename__ = "rollouts"

    deployment: Mapped[str] = mapped_column(
        ForeignKey("deployments.name", ondelete="CASCADE"), primary_key=True
    )
    revision: Mapped[str] = mapped_column(String(SHA256_LEN), doc="hash of the applied manifest")
    state: Mapped[str] = mapped_column(String(STATUS_LEN))
    current_wave: Mapped[int] = mapped_column(Integer, default=0)
    wave_count: Mapped[int] = mapped_column(Integer)
    wave_started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    message: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class RolloutDevice(Base):
    """A device in a rollout: its wave, whether it was released, and its content before the rollout."""

    __tablename__ = "rollout_devices"

    deployment: Mapped[str] = mapped_column(
        ForeignKey("rollouts.deployment", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    wave: Mapped[int] = mapped_column(Integer)
    released: Mapped[bool] = mapped_column(Boolean, default=False)
    reverted: Mapped[bool] = mapped_column(Boolean, default=False)
    previous: Mapped[dict[str, Any] | None] = mapped_column(
        JSON(none_as_null=True), nullable=True, doc="the desired content the device had before (null: none)"
    )


class PendingClear(Base):
    """A removed device whose retained messages the broker has not yet acknowledged clearing."""

    __tablename__ = "device_pending_clears"

    device_id: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    removed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
