"""The fleet service: apply and delete deployments, compute and publish desired states, run rollouts.

``Fleet.apply`` checks a manifest (known profiles, known models, a non-empty target, no
equal-priority conflict, an image for every selected device), stores it, splits its devices into
rollout waves and recomputes every device's desired state in one transaction: a device gets a
new generation only when its content changed. Publishing happens after the commit; what the
broker did not acknowledge stays pending in the store and goes out with the next
``publish_pending``. Nothing is stored or published when a check fails.

A signed state is valid for ``ttl`` (30 days); ``recompute`` re-issues the ones past half of it.
``Fleet.advance_rollouts`` is one pass of the rollout controller (``rollouts.py``).

The work is done in ``recompute.py`` (desired states), ``rollouts.py`` (the rollout tables;
``waves.py`` holds the pure wave logic), ``outbox.py`` (publishing), ``summaries.py`` (list and
status views) and ``queries.py`` (shared reads); this class holds the database, the signing key,
the profiles and the clock they share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import delete
from sqlalchemy.orm import Session

from cloud.config import Settings
from cloud.fleet import outbox
from cloud.fleet.credentials import (
    CredentialView,
    check_credentials,
    list_credentials,
    remove_credential,
    set_credential,
)
from cloud.fleet.desired import DEFAULT_TTL, content_hash
from cloud.fleet.explain import Explanation, explain
from cloud.fleet.queries import live_manifest, load_deployments, load_devices, models_of, stored_waves
from cloud.fleet.recompute import recompute_desired
from cloud.fleet.removal import ClearReport, clear_removed
from cloud.fleet.results import (
    ApplyError,
    ApplyResult,
    DeploymentProgress,
    DeploymentSummary,
    DeviceProgress,
    PublishReport,
    RevisionView,
    WaveProgress,
)
from cloud.fleet.revisions import forget, list_revisions, record_revision, revision_manifest
from cloud.fleet.rollouts import advance_rollouts, resume_rollout, retry_devices, start_rollout
from cloud.fleet.sql import aware
from cloud.fleet.summaries import progress, summaries
from cloud.fleet.targeting import DeploymentEntry, DeviceInfo, Resolution, placements, resolve, selected_ids
from cloud.fleet.waves import split_waves
from cloud.keys import load_or_create_signing_key
from cloud.store.db import Database, open_database
from cloud.store.deployments import set_deployment_models
from cloud.store.errors import NotFoundError
from cloud.store.fleet import RolloutDevice, RolloutRecord
from cloud.store.models import Deployment, DeploymentModel, ModelFollow
from cloud.store.refs import check_name, parse_model_ref
from edgemqtt.endpoint import Endpoint
from modules.contract import DeploymentManifest, DeviceProfile, utcnow
from modules.profiles import fallback_chain, load_profiles

__all__ = [
    "ApplyError",
    "ApplyResult",
    "DeploymentProgress",
    "DeploymentSummary",
    "DeviceProgress",
    "Fleet",
    "PublishReport",
    "WaveProgress",
    "parse_model_refs",
]

Clock = Callable[[], datetime]


class _DryRun(Exception):
    """Raised inside a dry run's transaction so that it rolls back, carrying the result."""

    def __init__(self, result: ApplyResult) -> None:
        super().__init__("dry run")
        self.result = result


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
        dry_run: bool = False,
    ) -> ApplyResult:
        """Store ``manifest``, recompute desired states and publish them (when ``endpoint`` is given).

        With ``dry_run`` everything is worked out and checked the same way, then rolled back:
        nothing is stored or published, and the result says what would have happened.
        """
        try:
            return self._apply(manifest, models, endpoint, source, dry_run)
        except _DryRun as done:
            return done.result

    def _apply(
        self,
        manifest: DeploymentManifest,
        models: Sequence[tuple[str, int]] | None,
        endpoint: Endpoint | None,
        source: str,
        dry_run: bool,
    ) -> ApplyResult:
        self.check_manifest(manifest, source)
        now = self.clock()
        name = manifest.name
        document = manifest.model_dump(mode="json")
        revision = content_hash(document)
        with self.db.transaction() as s:
            row = s.get(Deployment, name)
            created = row is None or row.manifest is None
            changed = created or row is None or row.manifest != document
            applied_at = now if changed or row is None else aware(row.updated_at)
            devices = load_devices(s)
            entries = [e for e in load_deployments(s) if e.name != name]
            entry = DeploymentEntry(manifest, applied_at)
            resolution = resolve(devices, [*entries, entry], self.chains)
            chosen = selected_ids(entry, devices)
            winning = sorted(d for d, a in resolution.assignments.items() if a.involves(name))
            problems = [p for p in resolution.problems if p.startswith(f"deployment {name!r}")]
            problems += resolution.conflict_messages(name)
            problems += check_credentials(s, manifest, winning, source)
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
                row.manifest = document
                row.updated_at = now
            s.flush()
            if models is not None:
                set_deployment_models(s, name, models)
            number = (
                record_revision(s, name, document, models_of(s).get(name, []), source, now)
                if changed
                else None
            )
            rollout = s.get(RolloutRecord, name)
            waves = split_waves(winning, manifest.rollout.waves)
            if rollout is None or rollout.revision != revision:
                start_rollout(s, manifest, revision, waves, now)
            else:
                waves = stored_waves(s, name)
            new = self._recompute(s, now, resolution, devices)
            result = ApplyResult(
                deployment=name,
                created=created,
                manifest_changed=changed,
                selected=len(chosen),
                winning=len(winning),
                new_generations=new,
                waves=[len(w) for w in waves],
                publish=PublishReport(0, 0, None),
                placements=placements(resolution, name),
            )
            if dry_run:
                raise _DryRun(result)
        return dataclasses.replace(result, publish=self._publish_or_count(endpoint), revision=number)

    def delete(self, name: str, *, endpoint: Endpoint | None = None) -> tuple[int, PublishReport]:
        """Delete a deployment; its devices fall to the next deployment or to an empty desired state."""
        now = self.clock()
        with self.db.transaction() as s:
            found = live_manifest(s, name)
            if found is None:
                raise NotFoundError(f"deployment {name!r} does not exist")
            s.execute(delete(RolloutDevice).where(RolloutDevice.deployment == name))
            s.execute(delete(RolloutRecord).where(RolloutRecord.deployment == name))
            s.execute(delete(DeploymentModel).where(DeploymentModel.deployment_name == name))
            s.execute(delete(ModelFollow).where(ModelFollow.deployment == name))
            forget(s, name)
            s.delete(found[0])
            s.flush()
            new = self._recompute(s, now)
        return new, self._publish_or_count(endpoint)

    def manifest(self, name: str) -> tuple[DeploymentManifest, list[str]]:
        """A stored manifest and the model versions (``name:version``) it is recorded to use."""
        with self.db.transaction() as s:
            found = live_manifest(s, name)
            if found is None:
                raise NotFoundError(f"deployment {name!r} does not exist")
            return found[1], models_of(s).get(name, [])

    def history(self, name: str) -> list[RevisionView]:
        """Every revision of a deployment, oldest first."""
        with self.db.transaction() as s:
            return list_revisions(s, name)

    def revision(self, name: str, number: int | None = None) -> tuple[int, DeploymentManifest]:
        """Revision ``number`` of a deployment (default: the one before the current) and its manifest."""
        with self.db.transaction() as s:
            return revision_manifest(s, name, number)

    def resume(
        self, name: str, *, retry: bool = False, endpoint: Endpoint | None = None
    ) -> tuple[str, int, PublishReport]:
        """Restart a halted or reverted rollout from its wave; with ``retry`` also give the devices that
        failed or rolled back a new generation of the same content. (what happened, new states,
        what publishing them did)."""
        now = self.clock()
        with self.db.transaction() as s:
            if live_manifest(s, name) is None:
                raise NotFoundError(f"deployment {name!r} does not exist")
            what = resume_rollout(s, name, now)
            force = retry_devices(s, name, now) if retry else frozenset()
            new = recompute_desired(s, now, self.key, self.ttl, self.chains, force=force)
        report = self._publish_or_count(endpoint)
        if retry:
            what += f"; {len(force)} failed or rolled-back device(s) get a new generation"
        return what, new, report

    # ---- registry credentials ----------------------------------------------------------------

    def set_credential(
        self, name: str, registry: str, username: str, password: str, *, endpoint: Endpoint | None = None
    ) -> tuple[int, bool, int, PublishReport]:
        """Create or rotate a registry credential; re-seal it to the devices that use it.

        Returns ``(revision, created, new desired states, publish report)``.
        """
        check_name(name, "credential name")
        now = self.clock()
        with self.db.transaction() as s:
            revision, created = set_credential(s, self.key, name, registry, username, password, now)
            s.flush()
            new = self._recompute(s, now)
        return revision, created, new, self._publish_or_count(endpoint)

    def credentials(self) -> list[CredentialView]:
        """Every registry credential (never a password) with the deployments that use it."""
        with self.db.transaction() as s:
            return list_credentials(s)

    def remove_credential(self, name: str) -> None:
        """Delete a registry credential no deployment uses."""
        with self.db.transaction() as s:
            remove_credential(s, name)

    def explain(self, device_id: str) -> Explanation:
        """Why ``device_id`` runs what it runs: competing deployments, the winner, each module's image."""
        with self.db.transaction() as s:
            device = next((d for d in load_devices(s) if d.id == device_id), None)
            if device is None:
                raise NotFoundError(f"device {device_id!r} is not registered")
            return explain(device, load_deployments(s), self.chains)

    def list_deployments(self) -> list[DeploymentSummary]:
        """Every deployment, by name, with its device counts."""
        with self.db.transaction() as s:
            return summaries(s)

    def progress(self, name: str) -> DeploymentProgress:
        """Per-wave and per-device progress of a deployment."""
        with self.db.transaction() as s:
            return progress(s, name)

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
        return recompute_desired(s, now, self.key, self.ttl, self.chains, resolution, devices)

    def pending_count(self) -> int:
        """How many desired states the broker has not acknowledged yet."""
        return outbox.pending_count(self.db)

    def publish_pending(self, endpoint: Endpoint) -> PublishReport:
        """Clear removed devices' retained messages, then publish every unacknowledged desired state."""
        return outbox.publish_pending(self.db, endpoint, self.clock)

    def clear_removed(self, endpoint: Endpoint) -> ClearReport:
        """Clear the retained messages of removed devices (``removal.py``); never raises for the broker."""
        return clear_removed(self.db, endpoint)

    def _publish_or_count(self, endpoint: Endpoint | None) -> PublishReport:
        if endpoint is None:
            return PublishReport(0, self.pending_count(), None)
        return self.publish_pending(endpoint)

    # ---- rollouts ----------------------------------------------------------------------------

    def advance_rollouts(self, *, endpoint: Endpoint | None = None) -> list[str]:
        """One pass of the rollout controller; returns a line per rollout that moved."""
        now = self.clock()
        with self.db.transaction() as s:
            lines = advance_rollouts(s, now)
            if lines:
                self._recompute(s, now)
        if lines and endpoint is not None:
            self.publish_pending(endpoint)
        return lines


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


def parse_model_refs(refs: Iterable[str]) -> list[tuple[str, int]]:
    """``["digits:3", ...]`` → ``[("digits", 3), ...]``; InvalidInputError on a malformed one."""
    out = []
    for ref in refs:
        name, version = parse_model_ref(ref, require_version=True)
        assert version is not None
        out.append((name, version))
    return out
