"""The OpenAPI 3 document served at ``/swagger.json``.

``/score``'s request and response schemas come, in this order, from the samples the entry script
declares with inference_schema, from module.json's ``input_sample``/``output_sample``, or from the
ONNX model's inputs and outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from modules.contract import ModuleInfo
from modules.scoring.service import ApiSchemas

if TYPE_CHECKING:
    from modules.scoring.backends import TensorSpec

_ERROR_SCHEMA = {
    "type": "object",
    "properties": {"error": {"type": "string"}, "request_id": {"type": "string"}},
    "required": ["error"],
}
_OBJECT = {"type": "object"}


def schema_from_sample(sample: Any) -> dict[str, Any]:
    """A JSON schema describing ``sample`` (arrays by their first item), without the example."""
    if isinstance(sample, bool):
        return {"type": "boolean"}
    if isinstance(sample, int):
        return {"type": "integer"}
    if isinstance(sample, float):
        return {"type": "number"}
    if isinstance(sample, str):
        return {"type": "string"}
    if isinstance(sample, dict):
        return {"type": "object", "properties": {str(k): schema_from_sample(v) for k, v in sample.items()}}
    if isinstance(sample, list | tuple):
        return {"type": "array", "items": schema_from_sample(sample[0]) if sample else {}}
    return {"nullable": True}


def _with_example(sample: Any) -> dict[str, Any] | None:
    if sample is None:
        return None
    return {**schema_from_sample(sample), "example": sample}


def schemas_from_samples(info: ModuleInfo | None) -> ApiSchemas:
    """Schemas from module.json's samples (none when it has none)."""
    if info is None or (info.input_sample is None and info.output_sample is None):
        return ApiSchemas()
    return ApiSchemas(_with_example(info.input_sample), _with_example(info.output_sample), "module.json")


def _tensor_schema(spec: TensorSpec) -> dict[str, Any]:
    """Nested arrays of the spec's rank, with an all-zero example (dynamic dimensions as 1)."""
    kind = spec.dtype.kind
    leaf: dict[str, Any] = {"f": {"type": "number"}, "b": {"type": "boolean"}}.get(
        kind, {"type": "integer"} if kind in "iu" else {"type": "string"}
    )
    example: Any = {"number": 0.0, "boolean": False, "integer": 0, "string": ""}[leaf["type"]]
    schema = leaf
    for dim in reversed(spec.shape):
        size = 1 if dim is None else dim
        schema = {"type": "array", "items": schema}
        if dim is None:
            schema["minItems"] = 1  # the server refuses empty tensors in /score
        else:
            schema["minItems"] = schema["maxItems"] = dim
        example = [example] * size
    return {
        **schema,
        "description": f"{spec.datatype} tensor of shape {spec.shape_text()}",
        "example": example,
    }


def schemas_from_specs(inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> ApiSchemas:
    """Schemas of the no-code ``/score`` body: ``{"data": ...}`` for one input, else ``{"inputs": {...}}``."""

    def document(specs: Sequence[TensorSpec], key: str, single_key: str | None) -> dict[str, Any]:
        tensors = {s.name: _tensor_schema(s) for s in specs}
        if single_key is not None and len(specs) == 1:
            only = tensors[specs[0].name]
            return {
                "type": "object",
                "required": [single_key],
                "properties": {single_key: only},
                "example": {single_key: only["example"]},
            }
        return {
            "type": "object",
            "required": [key],
            "properties": {key: {"type": "object", "properties": tensors, "required": list(tensors)}},
            "example": {key: {n: t["example"] for n, t in tensors.items()}},
        }

    return ApiSchemas(document(inputs, "inputs", "data"), document(outputs, "outputs", None), "model")


def _json_body(schema: dict[str, Any] | None) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema or {}}}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, **_json_body(_ERROR_SCHEMA)}


def build_document(
    *, title: str, version: str, schemas: ApiSchemas, models: Sequence[str], secured: bool, infer: bool
) -> dict[str, Any]:
    """The whole document; ``secured`` adds the bearer scheme, ``infer`` the OIP infer route."""
    security: list[dict[str, list[str]]] = [{"bearer": []}] if secured else []
    score_errors = {
        "400": _error("The input is malformed or does not match the model"),
        "413": _error("The body is larger than MAX_REQUEST_BYTES"),
        "415": _error("The Content-Type cannot carry JSON"),
        "500": _error("run() raised; the traceback is in the server log"),
        "503": _error("Not ready yet, or too many requests waiting"),
        "504": _error("run() took longer than SCORING_TIMEOUT"),
    }
    if secured:
        score_errors["401"] = _error("Missing or wrong bearer key")
    paths: dict[str, Any] = {
        "/": {"get": {"summary": "Liveness", "responses": {"200": {"description": "Healthy"}}}},
        "/score": {
            "post": {
                "summary": "Score the input",
                "requestBody": {"required": True, **_json_body(schemas.request)},
                "responses": {
                    "200": {"description": "The result", **_json_body(schemas.response)},
                    **score_errors,
                },
                "security": security,
            }
        },
        "/swagger.json": {
            "get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3"}}}
        },
        "/metrics": {
            "get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "Metrics"}}}
        },
        "/v2": {
            "get": {
                "summary": "Open Inference Protocol server metadata",
                "responses": {"200": {"description": "Name, version, extensions", **_json_body(_OBJECT)}},
            }
        },
        "/v2/health/live": {
            "get": {
                "summary": "Liveness (Open Inference Protocol)",
                "responses": {"200": {"description": "Live", **_json_body(_OBJECT)}},
            }
        },
        "/v2/health/ready": {
            "get": {
                "summary": "Readiness",
                "responses": {
                    "200": {"description": "Ready", **_json_body(_OBJECT)},
                    "503": {"description": "Not ready, with the reason", **_json_body(_OBJECT)},
                },
            }
        },
    }
    for name in models:
        paths[f"/v2/models/{name}"] = {
            "get": {
                "summary": f"Metadata of {name}",
                "responses": {"200": {"description": "Model metadata", **_json_body(_OBJECT)}},
            }
        }
        paths[f"/v2/models/{name}/ready"] = {
            "get": {
                "summary": f"Readiness of {name}",
                "responses": {
                    "200": {"description": "Ready", **_json_body(_OBJECT)},
                    "503": {"description": "Not ready yet", **_json_body(_OBJECT)},
                },
            }
        }
        if infer:
            paths[f"/v2/models/{name}/infer"] = {
                "post": {
                    "summary": f"Open Inference Protocol inference on {name}",
                    "requestBody": {"required": True, **_json_body({"type": "object"})},
                    "responses": {"200": {"description": "Inference response"}, **score_errors},
                    "security": security,
                }
            }
    document: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": title, "version": version, "description": f"Schemas from: {schemas.source}"},
        "paths": paths,
    }
    if secured:
        document["components"] = {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}}
    return document
