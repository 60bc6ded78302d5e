"""Per-device deployment status from what was published and what the device reported. Pure.

``pending``: the desired state is not published yet, or the device has not seen it;
``applying``: the device received it and is working on it; ``healthy``, ``failed``,
``rolled back`` (the agent went back to its last known good state), ``rejected`` (the agent
refused the message: signature, expiry, schema...) as the device reported them for the desired
generation; ``offline``: the device's last will said it went away.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

STALE_HEARTBEATS = 3
"""A device whose last report is older than this many of its heartbeats is stale."""
DEFAULT_HEARTBEAT_S = 60.0
"""The agent's default heartbeat, assumed for reports that do not say theirs."""

Status = Literal["pending", "applying", "healthy", "failed", "rolled back", "rejected", "offline", "stale"]
SETTLED_FAILED: frozenset[Status] = frozenset({"failed", "rolled back", "rejected"})


@dataclass(frozen=True)
class Reported:
    """The parts of a device's latest report that status needs."""

    generation_applied: int
    generation_received: int | None
    deployment_status: str
    reason: str | None = None
    heard_at: datetime | None = None
    """When the device made this report (its ``reported_at``, never later than its arrival)."""
    heartbeat_s: float | None = None
    """How often the device re-reports (the report's own ``heartbeat_s``)."""


@dataclass(frozen=True)
class Online:
    """The device's latest ``online`` message."""

    online: bool
    since: datetime


@dataclass(frozen=True)
class DeviceStatus:
    """A device's status for its desired generation, with a one-line explanation."""

    status: Status
    detail: str = ""
    heard_at: datetime | None = None
    """When the report this status comes from was made (None: no report)."""


_REPORTED: dict[str, Status] = {
    "applying": "applying",
    "healthy": "healthy",
    "failed": "failed",
    "rolled_back": "rolled back",
    "rejected": "rejected",
}


def device_status(
    generation: int,
    published: bool,
    reported: Reported | None,
    online: Online | None,
    now: datetime | None = None,
) -> DeviceStatus:
    """The status of a device whose desired state has ``generation``.

    With ``now``, a report older than ``STALE_HEARTBEATS`` of the device's heartbeats makes it
    ``stale``: never shown healthy on a report that no longer stands.
    """
    if online is not None and not online.online:
        return DeviceStatus("offline", f"offline since {online.since.isoformat(timespec='seconds')}")
    if not published:
        return DeviceStatus("pending", f"generation {generation} not published yet (broker unreachable)")
    if reported is None:
        return DeviceStatus("pending", f"no report yet for generation {generation}")
    reason, heard = reported.reason or "", reported.heard_at
    if now is not None and heard is not None:
        heartbeat = reported.heartbeat_s or DEFAULT_HEARTBEAT_S
        if now >= heard + timedelta(seconds=STALE_HEARTBEATS * heartbeat):
            quiet = (now - heard).total_seconds()
            return DeviceStatus(
                "stale",
                f"no report for {quiet:.0f} s ({STALE_HEARTBEATS} heartbeats of {heartbeat:g} s); "
                f"last said {reported.deployment_status}",
                heard,
            )
    if reported.generation_applied == generation:
        status = _REPORTED.get(reported.deployment_status, "applying")
        return DeviceStatus(status, reason, heard)
    if reported.generation_received == generation:
        if reported.deployment_status == "healthy":
            return DeviceStatus(
                "applying",
                f"received generation {generation}, still running generation {reported.generation_applied}",
                heard,
            )
        return DeviceStatus(_REPORTED.get(reported.deployment_status, "applying"), reason, heard)
    return DeviceStatus(
        "pending",
        f"device reports generation {reported.generation_applied}, desired is {generation}",
        heard,
    )
