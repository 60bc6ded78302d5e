"""``/deployments``: apply, list, show and delete deployments, rollout status, publishing.

The same ``Fleet`` operations as ``edgectl deploy``: apply checks and stores a manifest, signs each
affected device's desired state and publishes it to the broker the server was started with; what
the broker does not acknowledge stays pending (``POST /desired-states/publish`` or the server's
controller sends it later).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from cloud.api.errors import ApiError, invalid_body
from cloud.api.routing import Body, Param, Route, call, read_text, reply, require_media, services
from cloud.fleet.service import (
    ApplyResult,
    DeploymentProgress,
    DeploymentSummary,
    PublishReport,
    parse_model_refs,
)
from modules.contract import DeploymentManifest
from modules.documents import load_document

JSON = "application/json"
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml")


class DeploymentDocument(BaseModel):
    """What ``edgectl deploy show --json`` prints: the stored manifest and the model versions used."""

    manifest: DeploymentManifest
    models: list[str]


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


async def apply_deployment(request: web.Request) -> web.Response:
    """Apply a manifest: 201 when the deployment is new, 200 when it was updated or unchanged."""
    s = services(request)
    refs = request.query.getall("model", [])
    models = parse_model_refs(refs) if refs else None
    manifest = await _manifest(request)
    result = await call(s.fleet.apply, manifest, models=models, endpoint=s.endpoint, source="manifest")
    return reply(result, 201 if result.created else 200, {"Location": f"/deployments/{result.deployment}"})


async def list_deployments(request: web.Request) -> web.Response:
    """Every deployment with its target, rollout state and device counts."""
    return reply(await call(services(request).fleet.list_deployments))


async def show_deployment(request: web.Request) -> web.Response:
    """A deployment's stored manifest and the model versions it uses."""
    manifest, models = await call(services(request).fleet.manifest, request.match_info["name"])
    return reply(DeploymentDocument(manifest=manifest, models=models))


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
        response=ApplyResult,
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
        ),
        errors=(400, 413, 415),
        description="Answers 201 when the deployment is new, 200 when it existed. Desired states the "
        "broker did not acknowledge are stored as pending (see publish.pending in the result).",
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
