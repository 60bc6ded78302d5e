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

from cloud.fleet.credentials import DeviceSealer, credential_refs
from cloud.fleet.desired import EMPTY, DesiredContent, Renderer, content_hash, next_generation
from cloud.fleet.layering import compose
from cloud.fleet.queries import Gate, fetch, load_deployments, load_devices, load_gates, reverted_to
from cloud.fleet.sql import bind_value, upsert
from cloud.fleet.targeting import Assignment, DeploymentEntry, DeviceInfo, Resolution, resolve
from cloud.store.fleet import DesiredRecord
from modules.contract import RegistryCredentialRef


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
    credentials = credential_refs(s)
    renderer = Renderer(key, now, ttl, DeviceSealer.load(s, key) if credentials else None)
    contents: dict[tuple[int, tuple[str, ...]], tuple[DesiredContent, str]] = {}
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
                layers = tuple(
                    layer
                    for layer in assignment.layers
                    if layer is entry or _released(gates.get((layer.name, device.id)))
                )
                which = (id(assignment), tuple(layer.name for layer in layers))
                cached = contents.get(which)
                if cached is None:
                    cached = contents[which] = _content(
                        assignment, layers, device.profile, chains, credentials
                    )
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


def _released(gate: Gate | None) -> bool:
    """Whether a layer's rollout lets the device have it (no rollout, or released and not reverted)."""
    return gate is None or (gate.released and not gate.reverted)


def _content(
    assignment: Assignment,
    layers: tuple[DeploymentEntry, ...],
    profile: str,
    chains: Mapping[str, Sequence[str]],
    credentials: Mapping[str, RegistryCredentialRef],
) -> tuple[DesiredContent, str]:
    """The content of a device that has the ``layers`` of its assignment released to it so far.

    Its registry credentials are those its base and those layers list (unsealed: sealing is per
    device, at rendering).
    """
    modules = assignment.modules
    if layers != assignment.layers:
        base = assignment.base.name if assignment.base is not None else None
        modules = compose(base, assignment.base_modules, layers, profile, chains.get(profile, ())).modules
    sources = ([assignment.base] if assignment.base is not None else []) + [
        e for e in layers if e is not assignment.base
    ]
    names = dict.fromkeys(n for e in sources for n in e.manifest.registry_credentials)
    refs = tuple(credentials[n] for n in names if n in credentials)
    m = assignment.deployment.manifest
    content = DesiredContent(m.name, modules, m.rollback, m.health_deadline_s, refs)
    return content, content.hash


def _previous(
    data: Mapping[str, Any], cache: dict[str, tuple[DesiredContent, str]]
) -> tuple[DesiredContent, str]:
    """The content a reverted device ran before, parsed once per distinct content."""
    key = content_hash(data)
    if key not in cache:
        content = DesiredContent.from_json(data)
        cache[key] = (content, content.hash)
    return cache[key]
