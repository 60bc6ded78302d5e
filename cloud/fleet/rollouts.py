"""The rollout tables: start a deployment revision's rollout, and move rollouts on what devices report.

``start_rollout`` splits a revision's devices into waves (only the first released) and, when the
manifest reverts on halt, keeps what each device ran before. ``advance_rollouts`` is one pass of
the rollout controller over every rolling deployment: it asks ``waves.evaluate`` about the
current wave and releases the next wave, completes, or halts (and marks the released devices
reverted). The caller recomputes desired states when something moved.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from cloud.fleet.desired import content_from_payload
from cloud.fleet.queries import device_statuses, fetch, live_manifest, stored_waves
from cloud.fleet.sql import aware, bind_value, insert_many
from cloud.fleet.waves import Decision, evaluate
from cloud.store.fleet import DesiredRecord, RolloutDevice, RolloutRecord
from modules.contract import DeploymentManifest


def start_rollout(
    s: Session, manifest: DeploymentManifest, revision: str, waves: list[list[str]], now: datetime
) -> None:
    """Replace the deployment's rollout with a new one over ``waves``; wave 1 is released."""
    name = manifest.name
    previous: dict[str, Any] = {}
    if manifest.rollout.revert_on_halt:
        wanted = {d for wave in waves for d in wave}
        table = RolloutDevice.__table__
        by_hash: dict[str, Any] = {}
        for device, digest, payload in fetch(
            s, select(DesiredRecord.device_id, DesiredRecord.content_hash, DesiredRecord.payload)
        ):
            if device in wanted:
                if digest not in by_hash:
                    by_hash[digest] = bind_value(s, table.c.previous, content_from_payload(payload).to_json())
                previous[device] = by_hash[digest]
    s.execute(delete(RolloutDevice).where(RolloutDevice.deployment == name))
    s.execute(delete(RolloutRecord).where(RolloutRecord.deployment == name))
    s.add(
        RolloutRecord(
            deployment=name,
            revision=revision,
            state="rolling" if waves else "complete",
            current_wave=0,
            wave_count=len(waves),
            wave_started_at=now,
            message="wave 1 started" if waves else "no device to roll out to",
            updated_at=now,
        )
    )
    s.flush()
    rows = [
        (name, device, i, i == 0, False, previous.get(device))
        for i, wave in enumerate(waves)
        for device in wave
    ]
    columns = ("deployment", "device_id", "wave", "released", "reverted", "previous")
    insert_many(s, RolloutDevice.__table__, columns, rows)  # type: ignore[arg-type]


def advance_rollouts(s: Session, now: datetime) -> list[str]:
    """One controller pass over the rolling deployments; a line per rollout that moved."""
    statuses = device_statuses(s, now)
    lines: list[str] = []
    for rollout in s.scalars(select(RolloutRecord).where(RolloutRecord.state == "rolling")).all():
        found = live_manifest(s, rollout.deployment)
        if found is None:
            continue
        manifest = found[1]
        waves = stored_waves(s, rollout.deployment)
        released = {d for w in waves[: rollout.current_wave + 1] for d in w}
        mine = {
            d: st
            for d, (dep, st) in statuses.items()
            if d in released and (manifest.layered or dep == rollout.deployment)
        }
        decision = evaluate(
            waves,
            rollout.current_wave,
            {d: st.status for d, st in mine.items()},
            heard_at={d: st.heard_at for d, st in mine.items() if st.heard_at is not None},
            max_failure_ratio=manifest.rollout.max_failure_ratio,
            wave_started_at=aware(rollout.wave_started_at),
            now=now,
            deadline_s=manifest.health_deadline_s,
        )
        if decision.kind != "wait":
            lines.append(f"{rollout.deployment}: {_act(s, rollout, manifest, decision, now)}")
        rollout.message = decision.reason
    return lines


def _act(
    s: Session, rollout: RolloutRecord, manifest: DeploymentManifest, decision: Decision, now: datetime
) -> str:
    name = rollout.deployment
    rollout.updated_at = now
    if decision.kind == "advance":
        rollout.current_wave += 1
        rollout.wave_started_at = now
        s.execute(
            update(RolloutDevice)
            .where(RolloutDevice.deployment == name, RolloutDevice.wave == rollout.current_wave)
            .values(released=True)
        )
        return decision.reason
    if decision.kind == "complete":
        rollout.state = "complete"
        return decision.reason
    if manifest.rollout.revert_on_halt:
        s.execute(
            update(RolloutDevice)
            .where(RolloutDevice.deployment == name, RolloutDevice.released.is_(True))
            .values(reverted=True)
        )
        rollout.state = "reverted"
        return f"halted and reverted the released devices: {decision.reason}"
    rollout.state = "halted"
    return f"halted: {decision.reason}"


RESUMABLE = ("halted", "reverted")


def resume_rollout(s: Session, name: str, now: datetime) -> str:
    """Set a halted or reverted rollout rolling again from its current wave, with a new deadline.

    The released devices of a reverted rollout stop being reverted, so they get the deployment's
    content again. Anything else is left as it is and said so.
    """
    rollout = s.get(RolloutRecord, name)
    if rollout is None:
        return "no rollout to resume"
    if rollout.state not in RESUMABLE:
        return f"the rollout is {rollout.state}, not halted: nothing to resume"
    was = rollout.state
    if was == "reverted":
        s.execute(update(RolloutDevice).where(RolloutDevice.deployment == name).values(reverted=False))
    rollout.state = "rolling"
    rollout.wave_started_at = now
    rollout.updated_at = now
    rollout.message = f"resumed by the operator at wave {rollout.current_wave + 1} (was {was})"
    return rollout.message


RETRIED = frozenset({"failed", "rolled back", "rejected"})
"""Device statuses that ``deploy retry`` gives a new generation."""


def retry_devices(s: Session, name: str, now: datetime) -> frozenset[str]:
    """The devices of ``name`` whose last report says they failed it or rolled back."""
    return frozenset(
        d for d, (dep, st) in device_statuses(s, now).items() if dep == name and st.status in RETRIED
    )
