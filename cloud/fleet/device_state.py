"""What the cloud knows of each device's life: online, last seen, stale, and its latest report.

``DeviceState`` is what ``edgectl device list/show`` and ``GET /devices[/{id}]`` show beside a
device's registration. ``device_state`` is pure: it judges one device from its latest report, its
latest ``online`` message and the time. A device whose last report or heartbeat is older than
``STALE_HEARTBEATS`` of its own heartbeats (``heartbeat_s`` in the report, else
``DEFAULT_HEARTBEAT_S``) is **stale**: its report is kept for reference but its deployment status
reads ``stale``, never ``healthy``. ``device_states`` reads the store for many devices at once.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud.fleet.sql import aware
from cloud.fleet.status import DEFAULT_HEARTBEAT_S, STALE_HEARTBEATS
from cloud.store.fleet import DesiredRecord, OnlineRecord, ReportedRecord
from modules.contract import (
    Accelerator,
    ClientConflict,
    ModuleStatus,
    Rejection,
    ReportedState,
    SystemMetrics,
)

Presence = Literal["online", "offline", "stale", "never seen"]


class DeviceState(BaseModel):
    """One device as the fleet sees it now (all times UTC)."""

    model_config = ConfigDict(frozen=True)

    presence: Presence
    since: datetime | None = None
    """When the device last went online or offline."""
    last_seen: datetime | None = None
    """When its latest report or online message reached the cloud."""
    stale_after: datetime | None = None
    """When its latest report goes (or went) stale."""
    agent_version: str | None = None
    deployment: str | None = None
    generation_desired: int | None = None
    generation_applied: int | None = None
    deployment_status: str | None = None
    """As reported, or ``stale`` when the report is too old to stand."""
    reason: str | None = None
    last_rejection: Rejection | None = None
    client_conflict: ClientConflict | None = None
    modules: dict[str, ModuleStatus] = {}
    accelerators: list[Accelerator] = []
    system: SystemMetrics | None = None
    reported_at: datetime | None = None
    heartbeat_s: float | None = None

    @property
    def modules_healthy(self) -> int:
        """Modules running and ready (none while stale)."""
        if self.presence == "stale":
            return 0
        return sum(
            1
            for m in self.modules.values()
            if m.runtime_status == "running" and m.health is not None and m.health.ready
        )


def judge_presence(
    online: bool | None,
    reported_at: datetime | None,
    received_at: datetime | None,
    heartbeat_s: float | None,
    now: datetime,
) -> tuple[Presence, datetime | None]:
    """A device's presence and when its report goes stale, from the columns the store keeps.

    ``online``: its latest online message (None: none); ``reported_at``/``received_at``: its latest
    report (None: none). Cheap enough for every device of a large fleet (no report parsing).
    """
    if reported_at is None or received_at is None:
        if online is None:
            return "never seen", None
        return ("online" if online else "offline"), None
    # The device's own clock may be off: the report counts from when it arrived, at the latest.
    made = min(reported_at, received_at)
    stale_after = made + timedelta(seconds=STALE_HEARTBEATS * (heartbeat_s or DEFAULT_HEARTBEAT_S))
    if online is not None and not online:
        return "offline", stale_after
    if now >= stale_after:
        return "stale", stale_after
    return "online", stale_after


def device_state(
    report: ReportedState | None,
    received_at: datetime | None,
    online: tuple[bool, datetime, datetime] | None,
    now: datetime,
    desired: tuple[int, str | None] | None = None,
    refreshed_at: datetime | None = None,
) -> DeviceState:
    """Judge one device.

    ``online`` is ``(online, since, received_at)`` of its latest online message, ``desired``
    ``(generation, deployment)`` of its desired state, ``refreshed_at`` the ``reported_at`` of its
    latest heartbeat when newer than the report (the store's ``reported_at`` column).
    """
    generation, deployment = desired if desired else (None, None)
    seen = [t for t in (received_at, online[2] if online else None) if t is not None]
    base = DeviceState(
        presence="never seen",
        since=online[1] if online else None,
        last_seen=max(seen) if seen else None,
        generation_desired=generation,
        deployment=deployment,
    )
    if report is None or received_at is None:
        if online is not None:
            return base.model_copy(update={"presence": "online" if online[0] else "offline"})
        return base
    heartbeat = report.heartbeat_s or DEFAULT_HEARTBEAT_S
    fresh = max(report.reported_at, refreshed_at) if refreshed_at is not None else report.reported_at
    made = min(fresh, received_at)
    presence, stale_after = judge_presence(
        online[0] if online else None, fresh, received_at, report.heartbeat_s, now
    )
    status: str = report.deployment_status
    reason = report.reason
    if presence == "stale":
        status = "stale"
        reason = (
            f"no report for {(now - made).total_seconds():.0f} s ({STALE_HEARTBEATS} heartbeats of "
            f"{heartbeat:g} s): last said {report.deployment_status}"
            + (f" ({report.reason})" if report.reason else "")
        )
    return base.model_copy(
        update={
            "presence": presence,
            "stale_after": stale_after,
            "agent_version": report.agent_version,
            "generation_applied": report.generation_applied,
            "deployment_status": status,
            "reason": reason,
            "last_rejection": report.last_rejection,
            "client_conflict": report.client_conflict,
            "modules": dict(report.modules),
            "accelerators": list(report.accelerators),
            "system": report.system,
            "reported_at": report.reported_at,
            "heartbeat_s": report.heartbeat_s,
        }
    )


def device_states(s: Session, device_ids: Iterable[str], now: datetime) -> dict[str, DeviceState]:
    """The state of each of ``device_ids`` from the store (one query per table)."""
    ids = list(device_ids)
    if not ids:
        return {}
    reports: dict[str, tuple[ReportedState | None, datetime | None, datetime | None]] = {}
    for device_id, payload, received, refreshed in s.execute(
        select(
            ReportedRecord.device_id,
            ReportedRecord.payload,
            ReportedRecord.received_at,
            ReportedRecord.reported_at,
        ).where(ReportedRecord.device_id.in_(ids))
    ):
        try:
            parsed: ReportedState | None = ReportedState.model_validate_json(payload)
        except ValidationError:
            parsed = None
        reports[device_id] = (parsed, aware(received), aware(refreshed))
    online = {
        d: (bool(o), aware(since), aware(received))
        for d, o, since, received in s.execute(
            select(
                OnlineRecord.device_id, OnlineRecord.online, OnlineRecord.since, OnlineRecord.received_at
            ).where(OnlineRecord.device_id.in_(ids))
        )
    }
    desired = {
        d: (g, dep)
        for d, g, dep in s.execute(
            select(DesiredRecord.device_id, DesiredRecord.generation, DesiredRecord.deployment).where(
                DesiredRecord.device_id.in_(ids)
            )
        )
    }
    out = {}
    for d in ids:
        report, arrived, beat = reports.get(d, (None, None, None))
        out[d] = device_state(report, arrived, online.get(d), now, desired.get(d), beat)
    return out
