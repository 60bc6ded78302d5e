"""What the fleet service answers: apply and publish results, rollout progress, deployment summaries."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from cloud.store.errors import InvalidInputError
from modules.contract import DeploymentManifest


class ApplyError(InvalidInputError):
    """A manifest that cannot be applied; one line per problem, nothing was stored or published."""


@dataclass(frozen=True)
class PublishReport:
    """The result of publishing what the store owes the broker."""

    published: int
    pending: int
    error: str | None = None


@dataclass(frozen=True)
class RevisionView:
    """A row of ``deploy history``: one applied manifest."""

    number: int
    applied_at: datetime
    source: str
    models: list[str]
    images: dict[str, dict[str, str]]
    """module → profile → image, as the revision's manifest names them."""
    current: bool


@dataclass(frozen=True)
class ModulePlacement:
    """Which devices get a module from which deployment (``deploy apply`` lists them)."""

    module: str
    origin: str
    """Where it comes from, e.g. ``from 'base' (env.LOG_LEVEL by 'debug')``."""
    devices: list[str]


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
    revision: int | None = None
    """The revision this apply recorded (None when the manifest did not change, or a dry run)."""
    placements: list[ModulePlacement] = field(default_factory=list)
    """Per module and origin, the devices the deployment gives something to."""


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
    layered: bool = False


class DeploymentDocument(BaseModel):
    """What ``edgectl deploy show --json`` prints: the stored manifest and the model versions used."""

    manifest: DeploymentManifest
    models: list[str]
    follows: dict[str, str] = Field(
        default_factory=dict, description="module → the model whose newest version it follows"
    )
