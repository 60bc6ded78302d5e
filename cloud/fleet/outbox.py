"""What the store owes the broker: desired states not yet acknowledged, and removed devices to clear.

``publish_pending`` first clears the retained messages of removed devices (``removal.py``), then
publishes every unacknowledged desired state, in device order, and marks those the broker
acknowledged. A device whose clear is still pending is left out until the clear is done, so a
clear can never wipe a newer state. A desired
state whose generation changed while it was being published stays unpublished (the newer one is
owed).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from sqlalchemy import bindparam, func, select, update

from cloud.fleet.queries import fetch
from cloud.fleet.removal import PendingClear, clear_removed
from cloud.fleet.results import PublishReport
from cloud.fleet.sql import bind_value, executemany
from cloud.store.db import Database
from cloud.store.fleet import DesiredRecord
from edgemqtt import topics
from edgemqtt.bulk import Retained, publish_retained
from edgemqtt.endpoint import Endpoint


def pending_count(db: Database) -> int:
    """How many desired states the broker has not acknowledged yet."""
    with db.transaction() as s:
        return s.scalar(select(func.count()).where(DesiredRecord.published.is_(False))) or 0


def publish_pending(db: Database, endpoint: Endpoint, now: Callable[[], datetime]) -> PublishReport:
    """Clear removed devices, then publish every unacknowledged desired state; never raises for the broker."""
    cleared = clear_removed(db, endpoint)
    with db.transaction() as s:
        owed = fetch(
            s,
            select(DesiredRecord.device_id, DesiredRecord.generation, DesiredRecord.payload)
            .where(
                DesiredRecord.published.is_(False),
                DesiredRecord.device_id.not_in(select(PendingClear.device_id)),
            )
            .order_by(DesiredRecord.device_id),
        )
    if not owed:
        return PublishReport(0, pending_count(db), cleared.error)
    outcome = publish_retained(endpoint, [Retained(topics.desired(d), p.encode()) for d, _, p in owed])
    if outcome.acknowledged:
        table = DesiredRecord.__table__
        stmt = (
            update(table)  # type: ignore[arg-type]
            .where(table.c.device_id == bindparam("d"), table.c.generation == bindparam("g"))
            .values(published=bindparam("p", type_=table.c.published.type), published_at=bindparam("at"))
        )
        with db.transaction() as s:
            at = bind_value(s, table.c.published_at, now())
            rows = [(True, at, d, g) for d, g, _ in owed[: outcome.acknowledged]]
            executemany(s, stmt, ("p", "at", "d", "g"), rows)
    return PublishReport(outcome.acknowledged, pending_count(db), outcome.error or cleared.error)
