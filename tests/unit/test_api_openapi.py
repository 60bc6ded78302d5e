"""The API's OpenAPI document, built from the route table: structure, coverage and validity."""

from __future__ import annotations

import re
from typing import Any

import pytest

from cloud.api.app import ALL_ROUTES
from cloud.api.openapi import build_document
from cloud.api.routing import Route

METHODS = {"get", "post", "put", "patch", "delete"}


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return build_document(ALL_ROUTES, title="edgedeploy operator API", version="1.2.3")


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [r for v in node.values() for r in _refs(v)]
    if isinstance(node, list):
        return [r for v in node for r in _refs(v)]
    return []


def test_document_is_openapi_3_with_bearer_security(doc: dict[str, Any]) -> None:
    assert doc["openapi"] == "3.1.0"
    assert doc["info"] == {**doc["info"], "title": "edgedeploy operator API", "version": "1.2.3"}
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert doc["security"] == [{"bearer": []}]


def test_every_route_is_documented_once(doc: dict[str, Any]) -> None:
    documented = {
        (path, method) for path, item in doc["paths"].items() for method in item if method in METHODS
    }
    expected = {(r.openapi_path, r.method.lower()) for r in ALL_ROUTES}
    assert documented == expected
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ids) == len(set(ids)) == len(ALL_ROUTES)
    for path in (
        "/models",
        "/models/{name}",
        "/models/{name}/{version}",
        "/models/{name}/{version}/files/{path}",
        "/devices",
        "/devices/{id}",
        "/deployments",
        "/deployments/{name}",
        "/deployments/{name}/status",
        "/healthz",
        "/openapi.json",
    ):
        assert path in doc["paths"], path


@pytest.mark.parametrize("route", ALL_ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_operation_parameters_responses_and_security(doc: dict[str, Any], route: Route) -> None:
    op = doc["paths"][route.openapi_path][route.method.lower()]
    in_path = [p["name"] for p in op.get("parameters", []) if p["in"] == "path"]
    assert in_path == re.findall(r"\{(\w+)\}", route.openapi_path)
    assert all(p["required"] for p in op.get("parameters", []) if p["in"] == "path")
    assert str(route.status) in op["responses"]
    for status in route.errors:
        error = op["responses"][str(status)]
        assert error["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    if route.public:
        assert op["security"] == [] and "401" not in op["responses"]
    else:
        assert "security" not in op and "401" in op["responses"]
    if route.body is not None:
        assert set(op["requestBody"]["content"]) == set(route.body.content)


def test_response_schemas_are_the_views(doc: dict[str, Any]) -> None:
    schemas = doc["components"]["schemas"]
    listing = doc["paths"]["/models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert listing == {"type": "array", "items": {"$ref": "#/components/schemas/VersionSummary"}}
    assert {"name", "version", "files", "deployments"} <= set(schemas["VersionView"]["properties"])
    apply = doc["paths"]["/deployments"]["post"]
    assert {"201", "200"} <= set(apply["responses"])
    assert set(apply["requestBody"]["content"]) == {
        "application/json",
        "application/yaml",
        "application/x-yaml",
        "text/yaml",
    }
    download = doc["paths"]["/models/{name}/{version}/files/{path}"]["get"]["responses"]["200"]
    assert download["content"] == {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
    }


def test_every_reference_resolves(doc: dict[str, Any]) -> None:
    refs = _refs(doc)
    assert refs
    prefix = "#/components/schemas/"
    for ref in refs:
        assert ref.startswith(prefix) and ref.removeprefix(prefix) in doc["components"]["schemas"], ref


def test_document_passes_openapi_spec_validator(doc: dict[str, Any]) -> None:
    validator = pytest.importorskip(
        "openapi_spec_validator",
        reason="openapi-spec-validator not installed (pip install openapi-spec-validator)",
    )
    validator.validate(doc)
