"""``/deployments``: apply, list, show and delete deployments, rollout status, publishing.

The same ``Fleet`` operations as ``edgectl deploy``: apply checks and stores a manifest, signs each
affected device's desired state and publishes it to the broker the server was started with; what
the broker does not acknowledge stays pending (``POST /desired-states/publish`` or the server's
controller sends it later).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from cloud import continuous
from cloud.api.errors import ApiError, invalid_body
from cloud.api.routing import (
    Body,
    Param,
    Route,
    call,
    query_bool,
    read_text,
    reply,
    require_media,
    services,
)
from cloud.fleet.manifest_diff import manifest_diff
from cloud.fleet.results import DeploymentDocument, RevisionView
from cloud.fleet.service import (
    ApplyResult,
    DeploymentProgress,
    DeploymentSummary,
    Fleet,
    PublishReport,
    parse_model_refs,
)
from cloud.store.errors import NotFoundError
from modules.contract import DeploymentManifest
from modules.documents import load_document

JSON = "application/json"
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml")


@dataclass(frozen=True)
class AppliedDeployment(ApplyResult):
    """An apply's result, with the diff from the stored manifest (what ``deploy apply --json`` prints)."""

    dry_run: bool = False
    diff: list[str] = field(default_factory=list)
    rolled_back_to: int | None = None


def _applied(result: ApplyResult, **extra: Any) -> AppliedDeployment:
    return AppliedDeployment(**{f.name: getattr(result, f.name) for f in fields(result)}, **extra)


class ResumedDeployment(BaseModel):
    """What ``deploy resume`` / ``deploy retry`` did."""

    deployment: str
    result: str
    new_generations: int
    publish: PublishReport


class DeletedDeployment(BaseModel):
    """What ``edgectl deploy delete --json`` prints."""

    deployment: str
    new_generations: int
    publish: PublishReport


async def _manifest(request: web.Request) -> DeploymentManifest:
    media = require_media(request, (JSON, *YAML_TYPES))
    source = "manifest.json" if media == JSON else "manifest.yaml"
    data: Any = load_document(await read_text(request), source)
    if not isinstance(data, dict):
        raise ApiError(400, f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return DeploymentManifest.model_validate(data)
    except ValidationError as e:
        raise invalid_body(e, "manifest") from None


def _stored(fleet: Fleet, name: str) -> DeploymentManifest | None:
    try:
        return fleet.manifest(name)[0]
    except NotFoundError:
        return None


async def apply_deployment(request: web.Request) -> web.Response:
    """Apply a manifest: 201 when the deployment is new, 200 when it was updated or unchanged."""
    s = services(request)
    refs = request.query.getall("model", [])
    models = parse_model_refs(refs) if refs else None
    dry_run = query_bool(request, "dry_run")
    manifest = await _manifest(request)
    stored = await call(_stored, s.fleet, manifest.name)
    result = await call(
        s.fleet.apply,
        manifest,
        models=models,
        endpoint=None if dry_run else s.endpoint,
        source="manifest (REST)",
        dry_run=dry_run,
    )
    body = _applied(result, dry_run=dry_run, diff=manifest_diff(stored, manifest, "manifest"))
    status = 201 if result.created and not dry_run else 200
    return reply(body, status, {"Location": f"/deployments/{result.deployment}"})


async def deployment_revisions(request: web.Request) -> web.Response:
    """Every revision of a deployment, oldest first."""
    return reply(await call(services(request).fleet.history, request.match_info["name"]))


async def rollback_deployment(request: web.Request) -> web.Response:
    """Apply an earlier revision again (``to``; default the one before the current)."""
    s = services(request)
    name = request.match_info["name"]
    raw = request.query.get("to")
    if raw is not None and not raw.isdigit():
        raise ApiError(400, f"query to={raw!r}: expected a revision number")
    dry_run = query_bool(request, "dry_run")
    current = await call(_stored, s.fleet, name)
    number, target = await call(s.fleet.revision, name, int(raw) if raw is not None else None)
    result = await call(
        s.fleet.apply,
        target,
        endpoint=None if dry_run else s.endpoint,
        source=f"rollback to revision {number}",
        dry_run=dry_run,
    )
    diff = manifest_diff(current, target, f"revision {number}")
    return reply(_applied(result, dry_run=dry_run, diff=diff, rolled_back_to=number))


async def _resume(request: web.Request, retry: bool) -> web.Response:
    s = services(request)
    name = request.match_info["name"]
    what, new, report = await call(s.fleet.resume, name, retry=retry, endpoint=s.endpoint)
    return reply(ResumedDeployment(deployment=name, result=what, new_generations=new, publish=report))


async def resume_deployment(request: web.Request) -> web.Response:
    """Resume a halted or reverted rollout at its wave."""
    return await _resume(request, retry=False)


async def retry_deployment(request: web.Request) -> web.Response:
    """Resume, and give the devices that failed, rolled back or rejected it a new generation."""
    return await _resume(request, retry=True)


async def list_deployments(request: web.Request) -> web.Response:
    """Every deployment with its target, rollout state and device counts."""
    return reply(await call(services(request).fleet.list_deployments))


async def show_deployment(request: web.Request) -> web.Response:
    """A deployment's stored manifest, the model versions it uses and what its modules follow."""
    s = services(request)
    return reply(await call(continuous.deployment_document, s.fleet, request.match_info["name"]))


async def delete_deployment(request: web.Request) -> web.Response:
    """Delete a deployment; its devices fall back to the next deployment or to running nothing."""
    s = services(request)
    name = request.match_info["name"]
    changed, report = await call(s.fleet.delete, name, endpoint=s.endpoint)
    return reply(DeletedDeployment(deployment=name, new_generations=changed, publish=report))


async def deployment_status(request: web.Request) -> web.Response:
    """Per-wave and per-device progress of a deployment's rollout."""
    return reply(await call(services(request).fleet.progress, request.match_info["name"]))


async def publish_pending(request: web.Request) -> web.Response:
    """Publish the desired states the broker has not acknowledged yet."""
    s = services(request)
    report = await call(s.fleet.publish_pending, s.endpoint)
    if report.error:
        raise ApiError(503, report.error, report)
    return reply(report)


_MANIFEST_SCHEMA = {"schema": DeploymentManifest}
_DRY_RUN = Param("dry_run", "true: work it out and answer, store and publish nothing", {"type": "boolean"})

ROUTES = (
    Route(
        "GET",
        "/deployments",
        list_deployments,
        "List deployments",
        "deployments",
        response=list[DeploymentSummary],
    ),
    Route(
        "POST",
        "/deployments",
        apply_deployment,
        "Apply a deployment manifest (JSON or YAML)",
        "deployments",
        response=AppliedDeployment,
        status=201,
        also=(200,),
        body=Body({JSON: _MANIFEST_SCHEMA, **{t: _MANIFEST_SCHEMA for t in YAML_TYPES}}),
        query=(
            Param(
                "model",
                "NAME:VERSION of a registered model the deployment uses; repeatable",
                {"type": "string"},
                repeated=True,
            ),
            _DRY_RUN,
        ),
        errors=(400, 413, 415),
        description="Answers 201 when the deployment is new, 200 when it existed (or on a dry run). "
        "Desired states the broker did not acknowledge are stored as pending (see "
        "result.publish.pending); diff is the unified diff from the stored manifest.",
    ),
    Route(
        "GET",
        "/deployments/{name}/revisions",
        deployment_revisions,
        "Every revision of a deployment",
        "deployments",
        response=list[RevisionView],
        errors=(404,),
    ),
    Route(
        "POST",
        "/deployments/{name}/rollback",
        rollback_deployment,
        "Apply an earlier revision again",
        "deployments",
        response=AppliedDeployment,
        query=(
            Param("to", "the revision (default: the one before the current)", {"type": "integer"}),
            _DRY_RUN,
        ),
        errors=(400, 404),
    ),
    Route(
        "POST",
        "/deployments/{name}/resume",
        resume_deployment,
        "Resume a halted or reverted rollout at its wave",
        "deployments",
        response=ResumedDeployment,
        errors=(404,),
    ),
    Route(
        "POST",
        "/deployments/{name}/retry",
        retry_deployment,
        "Resume and give the failed devices a new generation",
        "deployments",
        response=ResumedDeployment,
        errors=(404,),
    ),
    Route(
        "GET",
        "/deployments/{name}",
        show_deployment,
        "Show a deployment's manifest and models",
        "deployments",
        response=DeploymentDocument,
        errors=(404,),
    ),
    Route(
        "DELETE",
        "/deployments/{name}",
        delete_deployment,
        "Delete a deployment",
        "deployments",
        response=DeletedDeployment,
        errors=(404,),
    ),
    Route(
        "GET",
        "/deployments/{name}/status",
        deployment_status,
        "Rollout progress per wave and per device",
        "deployments",
        response=DeploymentProgress,
        errors=(404,),
    ),
    Route(
        "POST",
        "/desired-states/publish",
        publish_pending,
        "Publish pending desired states",
        "deployments",
        response=PublishReport,
        errors=(503,),
    ),
)
