"""Reads of the fleet's tables that several fleet operations share: devices, deployments, gates, statuses."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVarTuple, Unpack

from sqlalchemy import Row, Select, select
from sqlalchemy.orm import Session

from cloud.fleet.sql import aware
from cloud.fleet.status import DeviceStatus, Online, Reported, device_status
from cloud.fleet.targeting import DeploymentEntry, DeviceInfo
from cloud.store.devices import Device, DeviceTag
from cloud.store.fleet import DesiredRecord, OnlineRecord, ReportedRecord, RolloutDevice, RolloutRecord
from cloud.store.models import Deployment, DeploymentModel, Model, ModelVersion
from modules.contract import DeploymentManifest

_Columns = TypeVarTuple("_Columns")


@dataclass(frozen=True)
class Gate:
    """A device in a rollout: its wave, and whether it was released or reverted."""

    wave: int
    released: bool
    reverted: bool


def fetch(s: Session, stmt: Select[Unpack[_Columns]]) -> Sequence[Row[Unpack[_Columns]]]:
    """All rows of a core select, fetched at once (faster than iterating a result row by row)."""
    return s.connection().execute(stmt).all()


def load_devices(s: Session) -> list[DeviceInfo]:
    """Every provisioned device with its profile and tags, by id."""
    tags: dict[str, dict[str, str]] = defaultdict(dict)
    for device, key, value in fetch(s, select(DeviceTag.device_id, DeviceTag.key, DeviceTag.value)):
        tags[device][key] = value
    return [
        DeviceInfo(d, p, tags.get(d, {}))
        for d, p in fetch(s, select(Device.id, Device.profile).order_by(Device.id))
    ]


def load_deployments(s: Session) -> list[DeploymentEntry]:
    """Every stored deployment with the time it was last applied."""
    return [
        DeploymentEntry(DeploymentManifest.model_validate(row.manifest), aware(row.updated_at))
        for row in s.scalars(select(Deployment).where(Deployment.manifest.is_not(None)))
    ]


def live_manifest(s: Session, name: str) -> tuple[Deployment, DeploymentManifest] | None:
    """A deployment's row and manifest; None when it does not exist (or was deleted)."""
    row = s.get(Deployment, name)
    if row is None or row.manifest is None:
        return None
    return row, DeploymentManifest.model_validate(row.manifest)


def load_gates(s: Session) -> dict[tuple[str, str], Gate]:
    """Every device's rollout gate, keyed by ``(deployment, device)``."""
    return {
        (dep, d): Gate(w, rel, rev)
        for dep, d, w, rel, rev in fetch(
            s,
            select(
                RolloutDevice.deployment,
                RolloutDevice.device_id,
                RolloutDevice.wave,
                RolloutDevice.released,
                RolloutDevice.reverted,
            ),
        )
    }


def reverted_to(s: Session) -> dict[tuple[str, str], dict[str, Any] | None]:
    """What each reverted device of a rollout ran before it (None: nothing), by ``(deployment, device)``."""
    return {
        (dep, d): previous
        for dep, d, previous in fetch(
            s,
            select(RolloutDevice.deployment, RolloutDevice.device_id, RolloutDevice.previous).where(
                RolloutDevice.reverted.is_(True)
            ),
        )
    }


def stored_waves(s: Session, name: str) -> list[list[str]]:
    """The device ids of each rollout wave of a deployment, by wave number.

    A wave whose devices were all removed is kept, empty, so that wave numbers stay those the
    rollout record and the rollout rows use.
    """
    waves: dict[int, list[str]] = defaultdict(list)
    for device, wave in fetch(
        s,
        select(RolloutDevice.device_id, RolloutDevice.wave)
        .where(RolloutDevice.deployment == name)
        .order_by(RolloutDevice.device_id),
    ):
        waves[wave].append(device)
    rollout = s.get(RolloutRecord, name)
    count = max(rollout.wave_count if rollout else 0, max(waves, default=-1) + 1)
    return [waves.get(i, []) for i in range(count)]


def models_of(s: Session) -> dict[str, list[str]]:
    """The model versions (``name:version``) each deployment is recorded to use."""
    out: dict[str, list[str]] = defaultdict(list)
    for deployment, model, version in fetch(
        s,
        select(DeploymentModel.deployment_name, Model.name, ModelVersion.version)
        .join(ModelVersion, DeploymentModel.model_version_id == ModelVersion.id)
        .join(Model, ModelVersion.model_id == Model.id)
        .order_by(Model.name, ModelVersion.version),
    ):
        out[deployment].append(f"{model}:{version}")
    return out


def device_statuses(s: Session, now: datetime) -> dict[str, tuple[str | None, DeviceStatus]]:
    """Each device with a desired state: the deployment it runs and its status for that state at ``now``."""
    reported = {
        d: Reported(ga, gr, st, reason, min(aware(made), aware(arrived)), heartbeat)
        for d, ga, gr, st, reason, made, arrived, heartbeat in fetch(
            s,
            select(
                ReportedRecord.device_id,
                ReportedRecord.generation_applied,
                ReportedRecord.generation_received,
                ReportedRecord.deployment_status,
                ReportedRecord.reason,
                ReportedRecord.reported_at,
                ReportedRecord.received_at,
                ReportedRecord.heartbeat_s,
            ),
        )
    }
    online = {
        d: Online(o, aware(since))
        for d, o, since in fetch(s, select(OnlineRecord.device_id, OnlineRecord.online, OnlineRecord.since))
    }
    out: dict[str, tuple[str | None, DeviceStatus]] = {}
    for d, generation, published, deployment in fetch(
        s,
        select(
            DesiredRecord.device_id,
            DesiredRecord.generation,
            DesiredRecord.published,
            DesiredRecord.deployment,
        ),
    ):
        out[d] = (deployment, device_status(generation, published, reported.get(d), online.get(d), now))
    return out
