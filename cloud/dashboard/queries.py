"""What the dashboard reads from the store: the devices page, the overview's counts and recent events.

Filters that SQL can answer (id search, tag, profile, deployment) are pushed into SQL. A device's
presence (online / offline / stale / never seen) depends on the time and on each device's own
heartbeat, so status filters and sorts are judged over a column-only query of the rows SQL kept
(no report payload is parsed); only the rows of the page shown are read whole.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any, Literal

from sqlalchemy import Select, and_, case, exists, func, select
from sqlalchemy.orm import Session

from cloud.fleet.device_state import DeviceState, Presence, device_states, judge_presence
from cloud.fleet.sql import aware
from cloud.store.devices import Device, DeviceTag
from cloud.store.fleet import DesiredRecord, OnlineRecord, ReportedRecord, RolloutRecord
from cloud.store.models import Deployment

PER_PAGE = 50
MAX_PER_PAGE = 200
PRESENCES: tuple[Presence, ...] = ("online", "offline", "stale", "never seen")
DEPLOYMENT_STATUSES = ("healthy", "applying", "failed", "rolled_back", "rejected")
FAILING = frozenset({"failed", "rolled_back", "rejected"})
STATUS_FILTERS = (*PRESENCES, *DEPLOYMENT_STATUSES, "failing")
SORTS = ("id", "profile", "last_seen", "status")
Sort = Literal["id", "profile", "last_seen", "status"]
EVENT_LIMIT = 15
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class FilterError(ValueError):
    """A filter or sort the devices page does not know; the message says what it accepts."""


@dataclass(frozen=True)
class DeviceFilter:
    """The devices page's query: search, filters, sort and page (all from the URL)."""

    q: str = ""
    tag: str = ""
    """``KEY=VALUE``."""
    profile: str = ""
    status: str = ""
    deployment: str = ""
    sort: Sort = "id"
    desc: bool = False
    page: int = 1
    per_page: int = PER_PAGE

    def check(self) -> DeviceFilter:
        """This filter, or FilterError naming what is wrong."""
        if self.status and self.status not in STATUS_FILTERS:
            raise FilterError(f"status {self.status!r}: expected one of {', '.join(STATUS_FILTERS)}")
        if self.sort not in SORTS:
            raise FilterError(f"sort {self.sort!r}: expected one of {', '.join(SORTS)}")
        if self.tag and ("=" not in self.tag or self.tag.startswith("=")):
            raise FilterError(f"tag {self.tag!r}: expected KEY=VALUE")
        if self.page < 1 or not 1 <= self.per_page <= MAX_PER_PAGE:
            raise FilterError(
                f"page {self.page} of {self.per_page}: expected page >= 1, 1-{MAX_PER_PAGE} rows"
            )
        return self

    def with_page(self, page: int) -> DeviceFilter:
        """The same query on another page."""
        return replace(self, page=page)


@dataclass(frozen=True)
class Light:
    """A device's columns that judge its presence and status (no report payload)."""

    id: str
    profile: str
    presence: Presence
    status: str | None
    """Its reported deployment status (None: never reported)."""
    last_seen: datetime | None

    @property
    def shown_status(self) -> str:
        """What the status column says: the deployment status while online, else the presence."""
        if self.presence == "online" and self.status:
            return self.status
        return self.presence

    def matches(self, wanted: str) -> bool:
        """Whether this device passes the ``status`` filter ``wanted``."""
        if wanted in PRESENCES:
            return self.presence == wanted
        if self.presence != "online":
            return False
        return self.status in FAILING if wanted == "failing" else self.status == wanted


@dataclass(frozen=True)
class DeviceRow:
    """A row of the devices page."""

    id: str
    profile: str
    tags: dict[str, str]
    state: DeviceState


@dataclass(frozen=True)
class DevicePage:
    """One page of devices and how many matched."""

    filter: DeviceFilter
    rows: list[DeviceRow]
    total: int

    @property
    def pages(self) -> int:
        """Number of pages (at least 1)."""
        return max(1, -(-self.total // self.filter.per_page))


@dataclass(frozen=True)
class Event:
    """Something an operator wants to notice: a rejection, a rollback, a halt, a device gone offline."""

    at: datetime
    kind: str
    subject: str
    """A device id or a deployment name."""
    link: str
    text: str


@dataclass
class Overview:
    """Fleet-wide counts for the overview."""

    devices: int = 0
    presence: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    """Deployment statuses of devices that are online."""

    @property
    def failing(self) -> int:
        """Online devices whose deployment failed, rolled back or was rejected."""
        return sum(self.statuses[s] for s in FAILING)


def _filtered_ids(f: DeviceFilter) -> Select[str, str]:
    query = select(Device.id, Device.profile)
    if f.q:
        escaped = f.q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        query = query.where(Device.id.like(f"%{escaped}%", escape="\\"))
    if f.profile:
        query = query.where(Device.profile == f.profile)
    if f.tag:
        key, _, value = f.tag.partition("=")
        query = query.where(
            exists().where(DeviceTag.device_id == Device.id, DeviceTag.key == key, DeviceTag.value == value)
        )
    if f.deployment:
        query = query.where(
            exists().where(DesiredRecord.device_id == Device.id, DesiredRecord.deployment == f.deployment)
        )
    return query


def _aware(dt: datetime | None) -> datetime | None:
    return None if dt is None else aware(dt)


def _light_rows(s: Session, query: Select[str, str], now: datetime) -> list[Light]:
    sub = query.subquery()
    rows = s.connection().execute(
        select(
            sub.c.id,
            sub.c.profile,
            OnlineRecord.online,
            OnlineRecord.received_at,
            ReportedRecord.reported_at,
            ReportedRecord.received_at,
            ReportedRecord.heartbeat_s,
            ReportedRecord.deployment_status,
        )
        .outerjoin(OnlineRecord, OnlineRecord.device_id == sub.c.id)
        .outerjoin(ReportedRecord, ReportedRecord.device_id == sub.c.id)
    )
    out = []
    for device_id, profile, online, online_seen, made, arrived, heartbeat, status in rows:
        made, arrived, online_seen = _aware(made), _aware(arrived), _aware(online_seen)
        presence, _ = judge_presence(None if online is None else bool(online), made, arrived, heartbeat, now)
        seen = [t for t in (arrived, online_seen) if t is not None]
        out.append(Light(device_id, profile, presence, status, max(seen) if seen else None))
    return out


def _sort_key(sort: Sort) -> Callable[[Light], tuple[Any, ...]]:
    if sort == "profile":
        return lambda d: (d.profile, d.id)
    if sort == "last_seen":
        return lambda d: (d.last_seen is not None, d.last_seen or _EPOCH, d.id)
    return lambda d: (d.shown_status, d.id)


def device_page(s: Session, f: DeviceFilter, now: datetime) -> DevicePage:
    """One page of devices matching ``f``, judged at ``now``."""
    query = _filtered_ids(f)
    offset = (f.page - 1) * f.per_page
    if not f.status and f.sort in ("id", "profile"):
        # Everything in SQL: count, order, limit.
        total = s.scalar(select(func.count()).select_from(query.subquery())) or 0
        order = (Device.profile, Device.id) if f.sort == "profile" else (Device.id,)
        ordered = query.order_by(*(c.desc() if f.desc else c for c in order))
        page = [(d, p) for d, p in s.execute(ordered.limit(f.per_page).offset(offset))]
    else:
        lights = _light_rows(s, query, now)
        if f.status:
            lights = [d for d in lights if d.matches(f.status)]
        lights.sort(key=_sort_key(f.sort), reverse=f.desc)
        total = len(lights)
        page = [(d.id, d.profile) for d in lights[offset : offset + f.per_page]]
    return DevicePage(f, rows_of(s, page, now), total)


def rows_of(s: Session, devices: list[tuple[str, str]], now: datetime) -> list[DeviceRow]:
    """Full rows (tags, state from the latest report) of ``(id, profile)`` pairs, in their order."""
    ids = [d for d, _ in devices]
    tags: dict[str, dict[str, str]] = {d: {} for d in ids}
    if ids:
        for device_id, key, value in s.execute(
            select(DeviceTag.device_id, DeviceTag.key, DeviceTag.value)
            .where(DeviceTag.device_id.in_(ids))
            .order_by(DeviceTag.key)
        ):
            tags[device_id][key] = value
    states = device_states(s, ids, now)
    return [DeviceRow(d, p, tags[d], states[d]) for d, p in devices]


def device_rows(s: Session, ids: list[str], now: datetime) -> list[DeviceRow]:
    """Full rows of the given device ids that exist, in the given order."""
    profiles = dict(s.execute(select(Device.id, Device.profile).where(Device.id.in_(ids))).all())
    return rows_of(s, [(d, profiles[d]) for d in ids if d in profiles], now)


def overview(s: Session, now: datetime) -> Overview:
    """Counts by presence and, for online devices, by deployment status."""
    out = Overview()
    for d in _light_rows(s, select(Device.id, Device.profile), now):
        out.devices += 1
        out.presence[d.presence] += 1
        if d.presence == "online" and d.status:
            out.statuses[d.status] += 1
    return out


def recent_events(s: Session, limit: int = EVENT_LIMIT) -> list[Event]:
    """The latest rejections, rollbacks, failures, halted rollouts and devices gone offline."""
    events: list[Event] = []
    for device_id, since in s.execute(
        select(OnlineRecord.device_id, OnlineRecord.since)
        .where(OnlineRecord.online.is_(False))
        .order_by(OnlineRecord.since.desc())
        .limit(limit)
    ):
        events.append(Event(aware(since), "offline", device_id, f"/ui/devices/{device_id}", "went offline"))
    for device_id, status, reason, arrived in s.execute(
        select(
            ReportedRecord.device_id,
            ReportedRecord.deployment_status,
            ReportedRecord.reason,
            ReportedRecord.received_at,
        )
        .where(ReportedRecord.deployment_status.in_(sorted(FAILING)))
        .order_by(ReportedRecord.received_at.desc())
        .limit(limit)
    ):
        text = status.replace("_", " ") + (f": {reason}" if reason else "")
        events.append(Event(aware(arrived), status, device_id, f"/ui/devices/{device_id}", text))
    for name, state, message, updated in s.execute(
        select(RolloutRecord.deployment, RolloutRecord.state, RolloutRecord.message, RolloutRecord.updated_at)
        .where(RolloutRecord.state.in_(("halted", "reverted")))
        .order_by(RolloutRecord.updated_at.desc())
        .limit(limit)
    ):
        text = f"rollout {state}" + (f": {message}" if message else "")
        events.append(Event(aware(updated), state, name, f"/ui/deployments/{name}", text))
    events.sort(key=lambda e: e.at, reverse=True)
    return events[:limit]


def healthy_by_deployment(s: Session) -> dict[str, tuple[int, int]]:
    """``{deployment: (devices, healthy on their desired generation)}`` in one grouped query."""
    healthy = func.sum(
        case(
            (
                and_(
                    ReportedRecord.deployment_status == "healthy",
                    ReportedRecord.generation_applied == DesiredRecord.generation,
                ),
                1,
            ),
            else_=0,
        )
    )
    rows = s.execute(
        select(DesiredRecord.deployment, func.count(), healthy)
        .outerjoin(ReportedRecord, ReportedRecord.device_id == DesiredRecord.device_id)
        .where(DesiredRecord.deployment.is_not(None))
        .group_by(DesiredRecord.deployment)
    )
    return {d: (int(n), int(h or 0)) for d, n, h in rows}


def fingerprint(s: Session) -> tuple[object, ...]:
    """A cheap value that changes whenever something the dashboard shows changes in the store."""
    parts = (
        select(func.count(), func.max(ReportedRecord.received_at)).select_from(ReportedRecord),
        select(func.count(), func.max(OnlineRecord.received_at)).select_from(OnlineRecord),
        select(func.count(), func.max(DesiredRecord.updated_at), func.max(DesiredRecord.published_at)),
        select(func.count(), func.max(RolloutRecord.updated_at), func.sum(RolloutRecord.current_wave)),
        select(func.count(), func.max(Deployment.updated_at)).where(Deployment.manifest.is_not(None)),
        select(func.count(), func.max(Device.updated_at)).select_from(Device),
    )
    out: list[object] = []
    for part in parts:
        out.extend(s.execute(part).one())
    return tuple(out)


def online_rows(s: Session) -> list[tuple[str, bool, datetime]]:
    """``(device, online, since)`` of every device's latest online message."""
    return [
        (d, bool(online), aware(since))
        for d, online, since in s.execute(
            select(OnlineRecord.device_id, OnlineRecord.online, OnlineRecord.since)
        )
    ]


def known_values(s: Session) -> tuple[list[str], list[str]]:
    """Profiles and deployments that exist, for the devices page's filter menus."""
    profiles = list(s.scalars(select(Device.profile).distinct().order_by(Device.profile)))
    deployments = list(
        s.scalars(select(Deployment.name).where(Deployment.manifest.is_not(None)).order_by(Deployment.name))
    )
    return profiles, deployments
