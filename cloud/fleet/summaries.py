"""Read-only views of deployments: ``deploy list`` summaries and ``deploy status`` progress."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud.fleet.queries import device_statuses, fetch, live_manifest, load_gates, models_of
from cloud.fleet.results import DeploymentProgress, DeploymentSummary, DeviceProgress, WaveProgress
from cloud.fleet.sql import aware
from cloud.fleet.status import DeviceStatus
from cloud.store.errors import NotFoundError
from cloud.store.fleet import DesiredRecord, RolloutRecord
from cloud.store.models import Deployment
from modules.contract import DeploymentManifest, utcnow


def summaries(s: Session) -> list[DeploymentSummary]:
    """Every deployment, by name, with its device counts."""
    statuses = device_statuses(s, utcnow())
    rollouts = {r.deployment: r for r in s.scalars(select(RolloutRecord))}
    per: dict[str, list[str]] = defaultdict(list)
    for deployment, status in statuses.values():
        if deployment is not None:
            per[deployment].append(status.status)
    layer_devices: dict[str, list[str]] = defaultdict(list)
    for (deployment, device), gate in load_gates(s).items():
        if gate.released and not gate.reverted and device in statuses:
            layer_devices[deployment].append(statuses[device][1].status)
    models = models_of(s)
    out = []
    for row in s.scalars(select(Deployment).order_by(Deployment.name)):
        if row.manifest is None:
            continue
        m = DeploymentManifest.model_validate(row.manifest)
        rollout = rollouts.get(row.name)
        if m.layered:
            per[row.name] = layer_devices[row.name]
        out.append(
            DeploymentSummary(
                name=row.name,
                priority=m.priority,
                modules=sorted({*m.modules, *m.overrides}),
                target=m.target.model_dump(exclude_defaults=True),
                rollout_state=rollout.state if rollout else "-",
                devices=len(per[row.name]),
                healthy=per[row.name].count("healthy"),
                models=models.get(row.name, []),
                updated_at=aware(row.updated_at),
                layered=m.layered,
            )
        )
    return out


def progress(s: Session, name: str) -> DeploymentProgress:
    """Per-wave and per-device progress of a deployment; NotFoundError when it does not exist."""
    found = live_manifest(s, name)
    if found is None:
        raise NotFoundError(f"deployment {name!r} does not exist")
    layered = found[1].layered
    rollout = s.get(RolloutRecord, name)
    statuses = device_statuses(s, utcnow())
    generations: dict[str, int] = {
        d: g for d, g in fetch(s, select(DesiredRecord.device_id, DesiredRecord.generation))
    }
    gates = {d: g for (dep, d), g in load_gates(s).items() if dep == name}
    devices = set(gates) | {d for d, (dep, _) in statuses.items() if dep == name}
    rows = []
    for device in sorted(devices):
        gate = gates.get(device)
        deployment, st = statuses.get(device, (None, DeviceStatus("pending", "nothing computed yet")))
        if gate is not None and not gate.released:
            status, detail = "waiting", f"wave {gate.wave + 1} not started"
        elif gate is not None and gate.reverted:
            status, detail = "reverted", f"back to what it ran before; device is {st.status}"
        elif deployment != name and not layered:
            status = "superseded"
            detail = f"runs deployment {deployment!r}" if deployment else "runs nothing"
        else:
            status, detail = st.status, st.detail
        rows.append(
            DeviceProgress(device, gate.wave if gate else None, status, detail, generations.get(device))
        )
    waves = []
    for i in range(rollout.wave_count if rollout else 0):
        members = [r for r in rows if r.wave == i]
        counts: dict[str, int] = defaultdict(int)
        for r in members:
            counts[r.status] += 1
        waves.append(
            WaveProgress(i, len(members), i <= (rollout.current_wave if rollout else 0), dict(counts))
        )
    return DeploymentProgress(
        name=name,
        rollout_state=rollout.state if rollout else "-",
        rollout_message=rollout.message if rollout else "",
        current_wave=rollout.current_wave if rollout else 0,
        waves=waves,
        devices=rows,
    )
