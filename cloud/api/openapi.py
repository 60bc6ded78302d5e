"""The OpenAPI 3.1 document of the API, generated from the route table.

Paths, parameters and statuses come from each ``Route``; request and response schemas are the JSON
schemas of the same pydantic models and dataclasses the handlers serialise, gathered under
``components.schemas``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

from pydantic import TypeAdapter

from cloud.api.routing import Route

REF_TEMPLATE = "#/components/schemas/{model}"
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Every error response",
    "properties": {
        "error": {"type": "string", "description": "what was wrong, in one line"},
        "detail": {"description": "more: field paths of a validation error, every line of a long message"},
        "request_id": {"type": "string", "description": "also in the X-Request-Id response header"},
    },
    "required": ["error", "detail", "request_id"],
}


def _is_type(value: Any) -> bool:
    return not isinstance(value, Mapping)


def _schemas(routes: Iterable[Route]) -> tuple[dict[tuple[str, str], Any], dict[str, Any]]:
    inputs: list[tuple[tuple[str, str], Any, TypeAdapter[Any]]] = []
    for route in routes:
        if route.response is not None:
            inputs.append(((route.operation_id, "response"), "serialization", TypeAdapter(route.response)))
        for media, obj in route.body.content.items() if route.body else ():
            schema = obj.get("schema")
            if schema is not None and _is_type(schema):
                inputs.append(((route.operation_id, media), "validation", TypeAdapter(schema)))
    by_key, definitions = TypeAdapter.json_schemas(inputs, ref_template=REF_TEMPLATE)
    return {key: schema for (key, _mode), schema in by_key.items()}, dict(definitions.get("$defs", {}))


def _parameters(route: Route) -> list[dict[str, Any]]:
    params: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in route.path_params
    ]
    for q in route.query:
        schema = {"type": "array", "items": dict(q.schema)} if q.repeated else dict(q.schema)
        param: dict[str, Any] = {
            "name": q.name,
            "in": "query",
            "required": q.required,
            "description": q.description,
            "schema": schema,
        }
        if q.repeated:
            param.update(style="form", explode=True)
        params.append(param)
    return params


def _error(status: int) -> dict[str, Any]:
    return {
        "description": HTTPStatus(status).phrase,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }


def _operation(route: Route, schemas: Mapping[tuple[str, str], Any]) -> dict[str, Any]:
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": [route.tag],
    }
    doc = route.description or (route.handler.__doc__ or "").strip()
    if doc:
        op["description"] = doc
    params = _parameters(route)
    if params:
        op["parameters"] = params
    if route.body is not None:
        content = {}
        for media, obj in route.body.content.items():
            entry = dict(obj)
            if "schema" in entry and _is_type(entry["schema"]):
                entry["schema"] = schemas[(route.operation_id, media)]
            content[media] = entry
        op["requestBody"] = {"required": route.body.required, "content": content}
        if route.body.description:
            op["requestBody"]["description"] = route.body.description
    ok: dict[str, Any] = {"description": HTTPStatus(route.status).phrase}
    if route.response is not None:
        ok["content"] = {route.response_media: {"schema": schemas[(route.operation_id, "response")]}}
    elif route.response_media != "application/json":
        ok["content"] = {route.response_media: {"schema": {"type": "string", "format": "binary"}}}
    responses: dict[str, Any] = {str(route.status): ok}
    for status in route.also:
        responses[str(status)] = {**ok, "description": HTTPStatus(status).phrase}
    errors = set(route.errors) | (set() if route.public else {401})
    for status in sorted(errors):
        responses[str(status)] = _error(status)
    op["responses"] = responses
    if route.public:
        op["security"] = []
    return op


def build_document(routes: Iterable[Route], *, title: str, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``routes``."""
    routes = list(routes)
    schemas, definitions = _schemas(routes)
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        paths.setdefault(route.openapi_path, {})[route.method.lower()] = _operation(route, schemas)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": title,
            "version": version,
            "description": "Operator API of edgedeploy: the operations of edgectl over HTTP. Every route "
            "except /healthz and /openapi.json needs 'Authorization: Bearer <token>'. Errors are JSON: "
            '{"error": "...", "detail": ..., "request_id": "..."}.',
        },
        "paths": paths,
        "components": {
            "schemas": {**definitions, "Error": ERROR_SCHEMA},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
