"""Model rollouts and continuous deployment: package a model version into a deployment's module.

``roll_out_model`` is what ``edgectl deploy set-model`` does: package ``MODEL[:VERSION]`` into
one image per profile the module lists, push them, and apply the deployment with those images
(its rollout waves apply). A module can *follow* a model (``set-model ... MODEL:latest --follow``):
then every newly registered version of that model, by ``edgectl model register`` or ``POST
/models/{name}``, is rolled out the same way (``follow_new_version``). Setting a pinned version
ends the follow, so what a module runs is always what ``deploy show`` says.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, select

from cloud.fleet.credentials import pull_auth
from cloud.fleet.model_update import with_model, with_module_images
from cloud.fleet.results import DeploymentDocument
from cloud.fleet.service import ApplyResult, Fleet
from cloud.inference_config import InferenceConfig, InferenceConfigError, load_inference_config
from cloud.packaging.errors import InputError, PackagingError, SmokeTestError
from cloud.packaging.models import models_from_registry
from cloud.packaging.package import PackageRequest, package
from cloud.packaging.progress import Progress
from cloud.store import Registry
from cloud.store.db import Database
from cloud.store.errors import InvalidInputError, NotFoundError, StoreError
from cloud.store.models import ModelFollow
from edgemqtt.endpoint import Endpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Follow:
    """A module that follows the newest version of ``model``, and how to package it."""

    deployment: str
    module: str
    model: str
    config_path: str | None = None
    registry: str | None = None
    repository: str | None = None
    smoke: bool = True


@dataclass(frozen=True)
class ModelRollout:
    """What rolling a model version into a module did."""

    deployment: str
    module: str
    model: str
    """``name:version`` rolled out."""
    images: dict[str, str]
    """profile → pushed image."""
    apply: ApplyResult


class RolloutError(Exception):
    """Packaging or applying failed; ``usage`` when the input was wrong rather than the machinery."""

    def __init__(self, message: str, *, usage: bool = False, log_tail: str | None = None) -> None:
        super().__init__(message)
        self.usage = usage
        self.log_tail = log_tail


def roll_out_model(
    fleet: Fleet,
    registry: Registry,
    follow: Follow,
    model_ref: str,
    *,
    endpoint: Endpoint | None,
    progress: Progress | None = None,
    source: str | None = None,
) -> ModelRollout:
    """Package ``model_ref`` into ``follow.module`` of ``follow.deployment`` and apply the deployment."""
    config = _config(follow.config_path)
    manifest, current = fleet.manifest(follow.deployment)
    spec = manifest.modules.get(follow.module)
    if spec is None:
        raise NotFoundError(
            f"deployment {follow.deployment!r} has no module {follow.module!r} "
            f"(modules: {', '.join(sorted(manifest.modules))})"
        )
    inputs = models_from_registry(registry, [model_ref])
    with fleet.db.transaction() as s:
        auth = pull_auth(s, fleet.key)
    request = PackageRequest(
        models=inputs,
        config=config,
        profiles=sorted(spec.images),
        name=follow.module,
        registry=follow.registry,
        repository=follow.repository,
        smoke=follow.smoke,
        pull_auth=auth,
    )
    with _packaging_errors():
        images = package(request, progress=progress)
    unpushed = [i.profile for i in images if i.ref is None]
    if unpushed:
        raise RolloutError(f"no pushed image for profile(s) {', '.join(unpushed)}; nothing was applied")
    model = inputs[0]
    pushed = {i.profile: str(i.ref) for i in images}
    result = fleet.apply(
        with_module_images(manifest, follow.module, pushed),
        models=with_model(current, model.name, model.version),
        endpoint=endpoint,
        source=source or f"set-model {model.name}:{model.version}",
    )
    return ModelRollout(follow.deployment, follow.module, f"{model.name}:{model.version}", pushed, result)


@dataclass(frozen=True)
class FollowOutcome:
    """One followed module after a new model version: rolled out, or why not."""

    follow: Follow
    rollout: ModelRollout | None = None
    error: str | None = None


def follow_new_version(
    fleet: Fleet,
    registry: Registry,
    model: str,
    version: int,
    *,
    endpoint: Endpoint | None,
    progress: Progress | None = None,
) -> list[FollowOutcome]:
    """Roll ``model:version`` out to every module that follows ``model``; one failure stops no other."""
    outcomes = []
    for follow in follows(fleet.db, model=model):
        ref = f"{model}:{version}"
        try:
            rollout = roll_out_model(
                fleet, registry, follow, ref, endpoint=endpoint, progress=progress, source=f"follows {ref}"
            )
        except (RolloutError, StoreError) as e:
            log.warning(
                "continuous deployment of %s to %s/%s failed: %s", ref, follow.deployment, follow.module, e
            )
            outcomes.append(FollowOutcome(follow, error=str(e)))
            continue
        log.info(
            "continuous deployment: %s rolled out to %s/%s (%d new desired state(s))",
            ref,
            follow.deployment,
            follow.module,
            rollout.apply.new_generations,
        )
        outcomes.append(FollowOutcome(follow, rollout))
    return outcomes


def set_follow(db: Database, follow: Follow) -> None:
    """Make ``follow.module`` of ``follow.deployment`` follow ``follow.model`` (replacing any follow)."""
    with db.transaction() as s:
        row = s.get(ModelFollow, (follow.deployment, follow.module))
        if row is None:
            row = ModelFollow(deployment=follow.deployment, module=follow.module)
            s.add(row)
        row.model = follow.model
        row.config_path = follow.config_path
        row.image_registry = follow.registry
        row.repository = follow.repository
        row.smoke = follow.smoke


def end_follow(db: Database, deployment: str, module: str) -> Follow | None:
    """Stop ``module`` of ``deployment`` following a model; the follow that ended, if any."""
    found = follows(db, deployment=deployment, module=module)
    with db.transaction() as s:
        s.execute(
            delete(ModelFollow).where(ModelFollow.deployment == deployment, ModelFollow.module == module)
        )
    return found[0] if found else None


def follows(
    db: Database, *, model: str | None = None, deployment: str | None = None, module: str | None = None
) -> list[Follow]:
    """The stored follows, filtered by model, deployment and module, by deployment and module."""
    query = select(ModelFollow).order_by(ModelFollow.deployment, ModelFollow.module)
    if model is not None:
        query = query.where(ModelFollow.model == model)
    if deployment is not None:
        query = query.where(ModelFollow.deployment == deployment)
    if module is not None:
        query = query.where(ModelFollow.module == module)
    with db.transaction() as s:
        return [
            Follow(r.deployment, r.module, r.model, r.config_path, r.image_registry, r.repository, r.smoke)
            for r in s.scalars(query)
        ]


def deployment_document(fleet: Fleet, name: str) -> DeploymentDocument:
    """``deploy show``: the stored manifest, the model versions it uses and what its modules follow."""
    manifest, models = fleet.manifest(name)
    following = {f.module: f.model for f in follows(fleet.db, deployment=name)}
    return DeploymentDocument(manifest=manifest, models=models, follows=following)


def _config(path: str | None) -> InferenceConfig:
    if path is None:
        return InferenceConfig()
    try:
        return load_inference_config(Path(path))
    except InferenceConfigError as e:
        raise InvalidInputError(str(e)) from e


@contextmanager
def _packaging_errors() -> Iterator[None]:
    try:
        yield
    except SmokeTestError as e:
        raise RolloutError(str(e), log_tail=e.log_tail) from e
    except InputError as e:
        raise RolloutError(str(e), usage=True) from e
    except PackagingError as e:
        raise RolloutError(str(e)) from e
