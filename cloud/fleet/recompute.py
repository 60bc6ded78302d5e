"""Recompute every device's desired state inside a transaction: new generations, signed and stored.

A device gets a new generation when its content changed (see ``desired.py``), when it has none
yet, or when its signed state is past half its validity (re-signed so that a retained state never
expires while a publisher runs). Devices waiting for their rollout wave keep what they have;
devices of a reverted rollout get what they ran before it. A device no deployment selects any
more gets the empty state once. Rows are written with one upsert, unpublished: publishing is the
caller's next step, after the commit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud.fleet.desired import EMPTY, DesiredContent, Renderer, content_hash, next_generation
from cloud.fleet.queries import fetch, load_deployments, load_devices, load_gates, reverted_to
from cloud.fleet.sql import bind_value, upsert
from cloud.fleet.targeting import DeviceInfo, Resolution, resolve
from cloud.store.fleet import DesiredRecord


def recompute_desired(
    s: Session,
    now: datetime,
    key: Ed25519PrivateKey,
    ttl: timedelta,
    chains: Mapping[str, Sequence[str]],
    resolution: Resolution | None = None,
    devices: list[DeviceInfo] | None = None,
    force: frozenset[str] = frozenset(),
) -> int:
    """Store a new signed desired state for every device that needs one; returns how many.

    Devices in ``force`` get a new generation even when their content did not change (``deploy
    retry``: an agent that rolled a generation back tries the next one again).
    """
    if devices is None:
        devices = load_devices(s)
    if resolution is None:
        resolution = resolve(devices, load_deployments(s), chains)
    stored: dict[str, tuple[int, str]] = {
        d: (g, h)
        for d, g, h in fetch(
            s, select(DesiredRecord.device_id, DesiredRecord.generation, DesiredRecord.content_hash)
        )
    }
    expiring = {
        d
        for (d,) in fetch(s, select(DesiredRecord.device_id).where(DesiredRecord.expires_at < now + ttl / 2))
    }
    gates = load_gates(s)
    before = reverted_to(s)
    renderer = Renderer(key, now, ttl)
    contents: dict[tuple[str, str], tuple[DesiredContent, str]] = {}
    reverted: dict[str, tuple[DesiredContent, str]] = {}
    empty = (EMPTY, EMPTY.hash)
    rows: list[tuple[Any, ...]] = []
    stamp = bind_value(s, DesiredRecord.__table__.c.updated_at, now)
    expires_at = bind_value(s, DesiredRecord.__table__.c.expires_at, renderer.expires_at)
    for device in devices:
        assignment = resolution.assignments.get(device.id)
        if assignment is None:
            if device.id not in stored:
                continue
            content, digest = empty
        else:
            entry = assignment.deployment
            gate = gates.get((entry.name, device.id))
            if gate is not None and gate.reverted:
                previous = before.get((entry.name, device.id))
                content, digest = _previous(previous, reverted) if previous else empty
            elif gate is not None and not gate.released:
                continue
            else:
                cached = contents.get((entry.name, device.profile))
                if cached is None:
                    m = entry.manifest
                    c = DesiredContent(m.name, assignment.modules, m.rollback, m.health_deadline_s)
                    cached = contents[(entry.name, device.profile)] = (c, c.hash)
                content, digest = cached
        generation = next_generation(stored.get(device.id), digest)
        if generation is None and device.id in stored and (device.id in expiring or device.id in force):
            generation = stored[device.id][0] + 1
        if generation is None:
            continue
        payload = renderer.payload(device.id, generation, content, digest).decode()
        rows.append(
            (device.id, generation, digest, content.deployment, payload, False, stamp, None, expires_at)
        )
    upsert(s, DesiredRecord.__table__, _COLUMNS, rows, ["device_id"])  # type: ignore[arg-type]
    return len(rows)


_COLUMNS = (
    "device_id",
    "generation",
    "content_hash",
    "deployment",
    "payload",
    "published",
    "updated_at",
    "published_at",
    "expires_at",
)


def _previous(
    data: Mapping[str, Any], cache: dict[str, tuple[DesiredContent, str]]
) -> tuple[DesiredContent, str]:
    """The content a reverted device ran before, parsed once per distinct content."""
    key = content_hash(data)
    if key not in cache:
        content = DesiredContent.from_json(data)
        cache[key] = (content, content.hash)
    return cache[key]
