"""The fleet service: apply and delete deployments, compute and publish desired states, run rollouts.

``Fleet.apply`` checks a manifest (known profiles, known models, a non-empty target, no
equal-priority conflict, an image for every selected device), stores it, splits its devices into
rollout waves and recomputes every device's desired state in one transaction: a device gets a
new generation only when its content changed. Publishing happens after the commit; what the
broker did not acknowledge stays pending in the store and goes out with the next
``publish_pending``. Nothing is stored or published when a check fails.

A signed state is valid for ``ttl`` (30 days); ``recompute`` re-issues the ones past half of it.

``Fleet.advance_rollouts`` is one pass of the rollout controller: it looks at the reports of each
rolling deployment's current wave and releases the next wave, completes, or halts (and reverts).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.orm import Session

from cloud.config import Settings
from cloud.fleet.desired import (
    DEFAULT_TTL,
    EMPTY,
    DesiredContent,
    Renderer,
    content_from_payload,
    content_hash,
    next_generation,
)
from cloud.fleet.mqtt import Endpoint
from cloud.fleet.publisher import Outgoing, PublishOutcome, publish_desired
from cloud.fleet.rollout import Decision, evaluate, split_waves
from cloud.fleet.sql import aware, bind_value, executemany, insert_many, upsert
from cloud.fleet.status import DeviceStatus, Online, Reported, device_status
from cloud.fleet.targeting import DeploymentEntry, DeviceInfo, Resolution, resolve, selected
from cloud.keys import load_or_create_signing_key
from cloud.store.db import Database, open_database
from cloud.store.deployments import set_deployment_models
from cloud.store.devices import Device, DeviceTag
from cloud.store.errors import InvalidInputError, NotFoundError
from cloud.store.fleet import DesiredRecord, OnlineRecord, ReportedRecord, RolloutDevice, RolloutRecord
from cloud.store.models import Deployment, DeploymentModel, Model, ModelVersion
from cloud.store.refs import parse_model_ref
from modules.contract import DeploymentManifest, DeviceProfile, utcnow
from modules.profiles import fallback_chain, load_profiles

Clock = Callable[[], datetime]


class ApplyError(InvalidInputError):
    """A manifest that cannot be applied; one line per problem, nothing was stored or published."""


@dataclass(frozen=True)
class PublishReport:
    """The result of publishing what the store owes the broker."""

    published: int
    pending: int
    error: str | None = None


@dataclass(frozen=True)
class ApplyResult:
    """What an apply changed."""

    deployment: str
    created: bool
    manifest_changed: bool
    selected: int
    winning: int
    new_generations: int
    waves: list[int]
    publish: PublishReport


@dataclass(frozen=True)
class DeviceProgress:
    """One device of a deployment, as ``deploy status`` shows it."""

    device: str
    wave: int | None
    status: str
    detail: str
    generation: int | None


@dataclass(frozen=True)
class WaveProgress:
    """One rollout wave: its size, whether it started, and its devices' statuses counted."""

    index: int
    devices: int
    started: bool
    counts: dict[str, int]


@dataclass(frozen=True)
class DeploymentProgress:
    """``deploy status``: the rollout, its waves and every device."""

    name: str
    rollout_state: str
    rollout_message: str
    current_wave: int
    waves: list[WaveProgress]
    devices: list[DeviceProgress]


@dataclass(frozen=True)
class DeploymentSummary:
    """A row of ``deploy list``."""

    name: str
    priority: int
    modules: list[str]
    target: dict[str, Any]
    rollout_state: str
    devices: int
    healthy: int
    models: list[str] = field(default_factory=list)
    updated_at: datetime | None = None


@dataclass
class _Gate:
    wave: int
    released: bool
    reverted: bool
    previous: dict[str, Any] | None


class Fleet:
    """Deployments, desired states and rollouts over one database and one signing key."""

    def __init__(
        self,
        db: Database,
        key: Ed25519PrivateKey,
        profiles: dict[str, DeviceProfile],
        *,
        clock: Clock = utcnow,
        ttl: timedelta = DEFAULT_TTL,
    ) -> None:
        self.db = db
        self.key = key
        self.profiles = profiles
        self.clock = clock
        self.ttl = ttl
        self.chains = {name: fallback_chain(name, profiles) for name in profiles}

    @classmethod
    def open(cls, settings: Settings) -> Fleet:
        """Open the database and load the signing key (created on first use) and the profiles."""
        db = open_database(settings.db_url)
        try:
            return cls(db, load_or_create_signing_key(settings.data_dir), load_profiles())
        except BaseException:
            db.dispose()
            raise

    def close(self) -> None:
        """Release the database connections."""
        self.db.dispose()

    # ---- deployments -------------------------------------------------------------------------

    def check_manifest(self, manifest: DeploymentManifest, source: str = "manifest") -> None:
        """ApplyError when the manifest names a device profile that does not exist."""
        known = ", ".join(sorted(self.profiles))
        problems = []
        if manifest.target.profile is not None and manifest.target.profile not in self.profiles:
            problems.append(
                f"{source}: target.profile: unknown device profile {manifest.target.profile!r} "
                f"(known: {known})"
            )
        for module, spec in manifest.modules.items():
            for profile in spec.images:
                if profile not in self.profiles:
                    problems.append(
                        f"{source}: modules.{module}.images.{profile}: unknown device profile {profile!r} "
                        f"(known: {known})"
                    )
        if problems:
            raise ApplyError("\n".join(problems))

    def apply(
        self,
        manifest: DeploymentManifest,
        *,
        models: Sequence[tuple[str, int]] | None = None,
        endpoint: Endpoint | None = None,
        source: str = "manifest",
    ) -> ApplyResult:
        """Store ``manifest``, recompute desired states and publish them (when ``endpoint`` is given)."""
        self.check_manifest(manifest, source)
        now = self.clock()
        name = manifest.name
        revision = content_hash(manifest.model_dump(mode="json"))
        with self.db.transaction() as s:
            row = s.get(Deployment, name)
            created = row is None or row.manifest is None
            changed = created or row is None or row.manifest != manifest.model_dump(mode="json")
            applied_at = now if changed or row is None else aware(row.updated_at)
            devices = _load_devices(s)
            entries = [e for e in _load_deployments(s) if e.name != name]
            entry = DeploymentEntry(manifest, applied_at)
            resolution = resolve(devices, [*entries, entry], self.chains)
            chosen = [d.id for d in devices if selected(entry, d)]
            winning = sorted(d for d, a in resolution.assignments.items() if a.deployment.name == name)
            problems = [p for p in resolution.problems if p.startswith(f"deployment {name!r}")]
            problems += resolution.conflict_messages(name)
            if not chosen:
                problems.append(
                    f"{source}: target selects no provisioned device ({_describe_target(manifest)}); "
                    "nothing was applied"
                )
            if problems:
                raise ApplyError("\n".join(problems))
            if row is None:
                row = Deployment(name=name, created_at=now)
                s.add(row)
            if changed:
                row.manifest = manifest.model_dump(mode="json")
                row.updated_at = now
            s.flush()
            if models is not None:
                set_deployment_models(s, name, models)
            rollout = s.get(RolloutRecord, name)
            waves = split_waves(winning, manifest.rollout.waves)
            if rollout is None or rollout.revision != revision:
                self._start_rollout(s, manifest, revision, waves, now)
            else:
                waves = _stored_waves(s, name)
            new = self._recompute(s, now, resolution, devices)
        return ApplyResult(
            deployment=name,
            created=created,
            manifest_changed=changed,
            selected=len(chosen),
            winning=len(winning),
            new_generations=new,
            waves=[len(w) for w in waves],
            publish=self.publish_pending(endpoint) if endpoint is not None else self._pending_only(),
        )

    def delete(self, name: str, *, endpoint: Endpoint | None = None) -> tuple[int, PublishReport]:
        """Delete a deployment; its devices fall to the next deployment or to an empty desired state."""
        now = self.clock()
        with self.db.transaction() as s:
            row = s.get(Deployment, name)
            if row is None or row.manifest is None:
                raise NotFoundError(f"deployment {name!r} does not exist")
            s.execute(delete(RolloutDevice).where(RolloutDevice.deployment == name))
            s.execute(delete(RolloutRecord).where(RolloutRecord.deployment == name))
            s.execute(delete(DeploymentModel).where(DeploymentModel.deployment_name == name))
            s.delete(row)
            s.flush()
            new = self._recompute(s, now)
        return new, self.publish_pending(endpoint) if endpoint is not None else self._pending_only()

    def manifest(self, name: str) -> tuple[DeploymentManifest, list[str]]:
        """A stored manifest and the model versions (``name:version``) it is recorded to use."""
        with self.db.transaction() as s:
            row = s.get(Deployment, name)
            if row is None or row.manifest is None:
                raise NotFoundError(f"deployment {name!r} does not exist")
            return DeploymentManifest.model_validate(row.manifest), _models_of(s).get(name, [])

    def list_deployments(self) -> list[DeploymentSummary]:
        """Every deployment, by name, with its device counts."""
        with self.db.transaction() as s:
            statuses = self._device_statuses(s)
            rollouts = {r.deployment: r for r in s.scalars(select(RolloutRecord))}
            per: dict[str, list[str]] = defaultdict(list)
            for deployment, status in statuses.values():
                if deployment is not None:
                    per[deployment].append(status.status)
            models = _models_of(s)
            out = []
            for row in s.scalars(select(Deployment).order_by(Deployment.name)):
                if row.manifest is None:
                    continue
                m = DeploymentManifest.model_validate(row.manifest)
                rollout = rollouts.get(row.name)
                out.append(
                    DeploymentSummary(
                        name=row.name,
                        priority=m.priority,
                        modules=sorted(m.modules),
                        target=m.target.model_dump(exclude_defaults=True),
                        rollout_state=rollout.state if rollout else "-",
                        devices=len(per[row.name]),
                        healthy=per[row.name].count("healthy"),
                        models=models.get(row.name, []),
                        updated_at=aware(row.updated_at),
                    )
                )
            return out

    # ---- desired states ----------------------------------------------------------------------

    def recompute(self) -> int:
        """Recompute every device's desired state; returns how many got a new generation.

        Picks up devices provisioned since the last apply, and re-signs (with the next generation)
        states past half their validity, so a retained state never expires while this runs.
        """
        with self.db.transaction() as s:
            return self._recompute(s, self.clock())

    def _recompute(
        self,
        s: Session,
        now: datetime,
        resolution: Resolution | None = None,
        devices: list[DeviceInfo] | None = None,
    ) -> int:
        if devices is None:
            devices = _load_devices(s)
        if resolution is None:
            resolution = resolve(devices, _load_deployments(s), self.chains)
        stored: dict[str, tuple[int, str]] = {}
        expiring: set[str] = set()
        refresh_before = now + self.ttl / 2
        for d, g, h, expires in s.connection().execute(
            select(
                DesiredRecord.device_id,
                DesiredRecord.generation,
                DesiredRecord.content_hash,
                DesiredRecord.expires_at,
            )
        ):
            stored[d] = (g, h)
            if expires is not None and aware(expires) < refresh_before:
                expiring.add(d)
        gates = _load_gates(s)
        renderer = Renderer(self.key, now, self.ttl)
        contents: dict[tuple[str, str], tuple[DesiredContent, str]] = {}
        empty_hash = EMPTY.hash
        rows: list[dict[str, Any]] = []
        stamp = bind_value(s, DesiredRecord.__table__.c.updated_at, now)
        expires_at = bind_value(s, DesiredRecord.__table__.c.expires_at, renderer.expires_at)
        for device in devices:
            assignment = resolution.assignments.get(device.id)
            if assignment is None:
                if device.id not in stored:
                    continue
                content, digest = EMPTY, empty_hash
            else:
                entry = assignment.deployment
                gate = gates.get((entry.name, device.id))
                if gate is not None and gate.reverted:
                    content = DesiredContent.from_json(gate.previous) if gate.previous else EMPTY
                    digest = content.hash
                elif gate is not None and not gate.released:
                    continue
                else:
                    key = (entry.name, device.profile)
                    if key not in contents:
                        m = entry.manifest
                        c = DesiredContent(m.name, assignment.modules, m.rollback, m.health_deadline_s)
                        contents[key] = (c, c.hash)
                    content, digest = contents[key]
            generation = next_generation(stored.get(device.id), digest)
            if generation is None and device.id in expiring:
                generation = stored[device.id][0] + 1
            if generation is None:
                continue
            payload = renderer.payload(device.id, generation, content, digest)
            rows.append(
                {
                    "device_id": device.id,
                    "generation": generation,
                    "content_hash": digest,
                    "deployment": content.deployment,
                    "payload": payload.decode(),
                    "published": False,
                    "updated_at": stamp,
                    "published_at": None,
                    "expires_at": expires_at,
                }
            )
        upsert(s, DesiredRecord.__table__, rows, ["device_id"])  # type: ignore[arg-type]
        return len(rows)

    def pending_count(self) -> int:
        """How many desired states the broker has not acknowledged yet."""
        with self.db.transaction() as s:
            return s.scalar(select(func.count()).where(DesiredRecord.published.is_(False))) or 0

    def _pending_only(self) -> PublishReport:
        return PublishReport(0, self.pending_count(), None)

    def publish_pending(self, endpoint: Endpoint) -> PublishReport:
        """Publish every unacknowledged desired state; marks those the broker acknowledged."""
        with self.db.transaction() as s:
            owed = [
                Outgoing(d, g, p.encode())
                for d, g, p in s.connection().execute(
                    select(DesiredRecord.device_id, DesiredRecord.generation, DesiredRecord.payload)
                    .where(DesiredRecord.published.is_(False))
                    .order_by(DesiredRecord.device_id)
                )
            ]
        if not owed:
            return PublishReport(0, 0)
        outcome: PublishOutcome = publish_desired(endpoint, owed)
        if outcome.acknowledged:
            table = DesiredRecord.__table__
            stmt = (
                update(table)  # type: ignore[arg-type]
                .where(table.c.device_id == bindparam("d"), table.c.generation == bindparam("g"))
                .values(published=bindparam("p", type_=table.c.published.type), published_at=bindparam("at"))
            )
            with self.db.transaction() as s:
                at = bind_value(s, table.c.published_at, self.clock())
                executemany(
                    s,
                    stmt,
                    [
                        {"d": m.device_id, "g": m.generation, "p": True, "at": at}
                        for m in outcome.acknowledged
                    ],
                )
        return PublishReport(len(outcome.acknowledged), len(owed) - len(outcome.acknowledged), outcome.error)

    # ---- rollouts ----------------------------------------------------------------------------

    def _start_rollout(
        self, s: Session, manifest: DeploymentManifest, revision: str, waves: list[list[str]], now: datetime
    ) -> None:
        name = manifest.name
        previous: dict[str, dict[str, Any]] = {}
        if manifest.rollout.revert_on_halt:
            wanted = {d for wave in waves for d in wave}
            for device, payload in s.connection().execute(
                select(DesiredRecord.device_id, DesiredRecord.payload)
            ):
                if device in wanted:
                    previous[device] = content_from_payload(payload).to_json()
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
        table = RolloutDevice.__table__
        rows = [
            {
                "deployment": name,
                "device_id": device,
                "wave": i,
                "released": i == 0,
                "reverted": False,
                "previous": bind_value(s, table.c.previous, previous.get(device)),
            }
            for i, wave in enumerate(waves)
            for device in wave
        ]
        insert_many(s, table, rows)  # type: ignore[arg-type]

    def advance_rollouts(self, *, endpoint: Endpoint | None = None) -> list[str]:
        """One pass of the rollout controller; returns a line per rollout that moved."""
        now = self.clock()
        lines: list[str] = []
        with self.db.transaction() as s:
            statuses = self._device_statuses(s)
            moved = False
            for rollout in s.scalars(select(RolloutRecord).where(RolloutRecord.state == "rolling")).all():
                row = s.get(Deployment, rollout.deployment)
                if row is None or row.manifest is None:
                    continue
                manifest = DeploymentManifest.model_validate(row.manifest)
                waves = _stored_waves(s, rollout.deployment)
                released = {d for w in waves[: rollout.current_wave + 1] for d in w}
                decision = evaluate(
                    waves,
                    rollout.current_wave,
                    {
                        d: st.status
                        for d, (dep, st) in statuses.items()
                        if d in released and dep == rollout.deployment
                    },
                    max_failure_ratio=manifest.rollout.max_failure_ratio,
                    wave_started_at=aware(rollout.wave_started_at),
                    now=now,
                    deadline_s=manifest.health_deadline_s,
                )
                if decision.kind != "wait":
                    moved = True
                    lines.append(f"{rollout.deployment}: {self._act(s, rollout, manifest, decision, now)}")
                rollout.message = decision.reason
            if moved:
                self._recompute(s, now)
        if moved and endpoint is not None:
            self.publish_pending(endpoint)
        return lines

    def _act(
        self,
        s: Session,
        rollout: RolloutRecord,
        manifest: DeploymentManifest,
        decision: Decision,
        now: datetime,
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

    # ---- status ------------------------------------------------------------------------------

    def _device_statuses(self, s: Session) -> dict[str, tuple[str | None, DeviceStatus]]:
        reported = {
            d: Reported(ga, gr, st, reason)
            for d, ga, gr, st, reason in s.connection().execute(
                select(
                    ReportedRecord.device_id,
                    ReportedRecord.generation_applied,
                    ReportedRecord.generation_received,
                    ReportedRecord.deployment_status,
                    ReportedRecord.reason,
                )
            )
        }
        online = {
            d: Online(o, aware(since))
            for d, o, since in s.connection().execute(
                select(OnlineRecord.device_id, OnlineRecord.online, OnlineRecord.since)
            )
        }
        out: dict[str, tuple[str | None, DeviceStatus]] = {}
        for d, generation, published, deployment in s.connection().execute(
            select(
                DesiredRecord.device_id,
                DesiredRecord.generation,
                DesiredRecord.published,
                DesiredRecord.deployment,
            )
        ):
            out[d] = (deployment, device_status(generation, published, reported.get(d), online.get(d)))
        return out

    def progress(self, name: str) -> DeploymentProgress:
        """Per-wave and per-device progress of a deployment."""
        with self.db.transaction() as s:
            row = s.get(Deployment, name)
            if row is None or row.manifest is None:
                raise NotFoundError(f"deployment {name!r} does not exist")
            rollout = s.get(RolloutRecord, name)
            statuses = self._device_statuses(s)
            generations: dict[str, int] = {
                d: g
                for d, g in s.connection().execute(select(DesiredRecord.device_id, DesiredRecord.generation))
            }
            gates = {d: g for (dep, d), g in _load_gates(s).items() if dep == name}
            devices = set(gates) | {d for d, (dep, _) in statuses.items() if dep == name}
            rows = []
            for device in sorted(devices):
                gate = gates.get(device)
                deployment, st = statuses.get(device, (None, DeviceStatus("pending", "nothing computed yet")))
                if gate is not None and not gate.released:
                    status, detail = "waiting", f"wave {gate.wave + 1} not started"
                elif gate is not None and gate.reverted:
                    status, detail = "reverted", f"back to what it ran before; device is {st.status}"
                elif deployment != name:
                    status = "superseded"
                    detail = f"runs deployment {deployment!r}" if deployment else "runs nothing"
                else:
                    status, detail = st.status, st.detail
                rows.append(
                    DeviceProgress(
                        device, gate.wave if gate else None, status, detail, generations.get(device)
                    )
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


def _describe_target(manifest: DeploymentManifest) -> str:
    t = manifest.target
    parts = []
    if t.device_ids:
        parts.append(f"device_ids {', '.join(t.device_ids)}")
    if t.tags:
        parts.append("tags " + ", ".join(f"{k}={v}" for k, v in t.tags.items()))
    if t.profile:
        parts.append(f"profile {t.profile}")
    return "; ".join(parts)


def _load_devices(s: Session) -> list[DeviceInfo]:
    tags: dict[str, dict[str, str]] = defaultdict(dict)
    for device, key, value in s.connection().execute(
        select(DeviceTag.device_id, DeviceTag.key, DeviceTag.value)
    ):
        tags[device][key] = value
    return [
        DeviceInfo(d, p, tags.get(d, {}))
        for d, p in s.connection().execute(select(Device.id, Device.profile).order_by(Device.id))
    ]


def _load_deployments(s: Session) -> list[DeploymentEntry]:
    return [
        DeploymentEntry(DeploymentManifest.model_validate(row.manifest), aware(row.updated_at))
        for row in s.scalars(select(Deployment).where(Deployment.manifest.is_not(None)))
    ]


def _load_gates(s: Session) -> dict[tuple[str, str], _Gate]:
    return {
        (dep, d): _Gate(w, rel, rev, prev)
        for dep, d, w, rel, rev, prev in s.connection().execute(
            select(
                RolloutDevice.deployment,
                RolloutDevice.device_id,
                RolloutDevice.wave,
                RolloutDevice.released,
                RolloutDevice.reverted,
                RolloutDevice.previous,
            )
        )
    }


def _stored_waves(s: Session, name: str) -> list[list[str]]:
    waves: dict[int, list[str]] = defaultdict(list)
    for device, wave in s.connection().execute(
        select(RolloutDevice.device_id, RolloutDevice.wave)
        .where(RolloutDevice.deployment == name)
        .order_by(RolloutDevice.device_id)
    ):
        waves[wave].append(device)
    return [waves[i] for i in sorted(waves)]


def _models_of(s: Session) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for deployment, model, version in s.connection().execute(
        select(DeploymentModel.deployment_name, Model.name, ModelVersion.version)
        .join(ModelVersion, DeploymentModel.model_version_id == ModelVersion.id)
        .join(Model, ModelVersion.model_id == Model.id)
        .order_by(Model.name, ModelVersion.version)
    ):
        out[deployment].append(f"{model}:{version}")
    return out


def parse_model_refs(refs: Iterable[str]) -> list[tuple[str, int]]:
    """``["digits:3", ...]`` → ``[("digits", 3), ...]``; InvalidInputError on a malformed one."""
    out = []
    for ref in refs:
        name, version = parse_model_ref(ref, require_version=True)
        assert version is not None
        out.append((name, version))
    return out
