"""What removing a device leaves to the fleet: its rows go, its retained MQTT messages are cleared.

``forget_device`` runs in the transaction that deletes the device: it deletes the device's
desired state, last report, online status and rollout membership, and records a pending clear
when the device could have left retained messages (it had a desired state, or reported).
``clear_removed`` publishes an empty retained message on ``edge/{d}/desired``, ``edge/{d}/reported``
and ``edge/{d}/online`` of every pending device (as the cloud's MQTT user) and drops the pending
rows the broker acknowledged. Until then a stale retained desired state could reach an agent
that connects under the same id, so the id cannot be provisioned again while its clear is
pending (``is_clear_pending``), and ``Fleet.publish_pending`` clears before it publishes.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from cloud.store.db import Database
from cloud.store.fleet import DesiredRecord, OnlineRecord, PendingClear, ReportedRecord, RolloutDevice
from edgemqtt import topics
from edgemqtt.bulk import Retained, publish_retained
from edgemqtt.endpoint import Endpoint
from modules.contract import utcnow

CLEARED_TOPICS = (topics.desired, topics.reported, topics.online)
"""The retained topics of a device, cleared when it is removed."""


@dataclass(frozen=True)
class ClearReport:
    """Removed devices whose retained messages were cleared now, and those still pending."""

    cleared: list[str]
    pending: list[str]
    error: str | None = None


def forget_device(session: Session, device_id: str) -> bool:
    """Delete the device's fleet rows; True when its retained messages must be cleared (recorded).

    That is when it had a desired state (it may have been published) or the device reported or
    went online: a device that was never deployed to and never connected left nothing retained.
    """
    seen = any(
        session.scalar(select(table.device_id).where(table.device_id == device_id)) is not None
        for table in (DesiredRecord, ReportedRecord, OnlineRecord)
    )
    for table in (DesiredRecord, ReportedRecord, OnlineRecord, RolloutDevice):
        session.execute(delete(table).where(table.device_id == device_id))
    pending = is_clear_pending(session, device_id)
    if seen and not pending:
        session.add(PendingClear(device_id=device_id, removed_at=utcnow()))
    return seen or pending


def is_clear_pending(session: Session, device_id: str) -> bool:
    """Whether the retained messages of a removed device of this id still wait to be cleared."""
    return session.get(PendingClear, device_id) is not None


def pending_clears(session: Session) -> list[str]:
    """Removed devices whose retained messages still wait to be cleared, by id."""
    return list(session.scalars(select(PendingClear.device_id).order_by(PendingClear.device_id)))


def clear_removed(db: Database, endpoint: Endpoint) -> ClearReport:
    """Clear the retained messages of every removed device that is pending; forget those acknowledged."""
    with db.transaction() as s:
        devices = pending_clears(s)
    if not devices:
        return ClearReport([], [])
    messages = [Retained(topic(d), b"") for d in devices for topic in CLEARED_TOPICS]
    outcome = publish_retained(endpoint, messages)
    cleared = devices[: outcome.acknowledged // len(CLEARED_TOPICS)]
    if cleared:
        with db.transaction() as s:
            for table in (ReportedRecord, OnlineRecord):
                s.execute(delete(table).where(table.device_id.in_(cleared)))
            s.execute(delete(PendingClear).where(PendingClear.device_id.in_(cleared)))
    return ClearReport(cleared, devices[len(cleared) :], outcome.error)
