"""Deployment revisions: every apply that changes a deployment's manifest is one, numbered from 1.

``deploy history`` lists them, ``deploy rollback`` applies an earlier one again (as a new
revision, so the history only grows).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from cloud.fleet.results import RevisionView
from cloud.fleet.sql import aware
from cloud.store.errors import NotFoundError
from cloud.store.models import DeploymentRevision
from modules.contract import DeploymentManifest


def record_revision(
    s: Session, name: str, document: dict[str, Any], models: list[str], source: str, now: datetime
) -> int:
    """Store ``document`` as the deployment's next revision; its number."""
    last = s.scalar(select(func.max(DeploymentRevision.number)).where(DeploymentRevision.deployment == name))
    number = (last or 0) + 1
    s.add(
        DeploymentRevision(
            deployment=name, number=number, manifest=document, models=models, source=source, applied_at=now
        )
    )
    return number


def list_revisions(s: Session, name: str) -> list[RevisionView]:
    """Every revision of ``name``, oldest first; the last one is what is applied."""
    rows = s.scalars(
        select(DeploymentRevision)
        .where(DeploymentRevision.deployment == name)
        .order_by(DeploymentRevision.number)
    ).all()
    if not rows:
        raise NotFoundError(f"deployment {name!r} has no revisions (it does not exist)")
    return [
        RevisionView(
            number=r.number,
            applied_at=aware(r.applied_at),
            source=r.source,
            models=list(r.models or []),
            images={m: dict(spec.get("images", {})) for m, spec in r.manifest.get("modules", {}).items()},
            current=r is rows[-1],
        )
        for r in rows
    ]


def revision_manifest(s: Session, name: str, number: int | None) -> tuple[int, DeploymentManifest]:
    """The manifest of revision ``number`` (None: the one before the current one)."""
    numbers = list(
        s.scalars(
            select(DeploymentRevision.number)
            .where(DeploymentRevision.deployment == name)
            .order_by(DeploymentRevision.number)
        )
    )
    if not numbers:
        raise NotFoundError(f"deployment {name!r} has no revisions (it does not exist)")
    if number is None:
        if len(numbers) < 2:
            raise NotFoundError(
                f"deployment {name!r} has only revision {numbers[0]}: nothing to roll back to"
            )
        number = numbers[-2]
    row = s.get(DeploymentRevision, (name, number))
    if row is None:
        have = ", ".join(map(str, numbers))
        raise NotFoundError(f"deployment {name!r} has no revision {number} (revisions: {have})")
    return number, DeploymentManifest.model_validate(row.manifest)


def forget(s: Session, name: str) -> None:
    """Delete the revisions of a deleted deployment."""
    s.execute(delete(DeploymentRevision).where(DeploymentRevision.deployment == name))
