"""OpenAPI schemas from samples and from tensor specs."""

from __future__ import annotations

from modules.contract import ModuleInfo
from modules.scoring.backends import TensorSpec
from modules.scoring.openapi import (
    build_document,
    schema_from_sample,
    schemas_from_samples,
    schemas_from_specs,
)


def test_schema_from_sample() -> None:
    sample = {"data": [[1.5, 2]], "name": "x", "flag": True, "n": 3, "none": None}
    assert schema_from_sample(sample) == {
        "type": "object",
        "properties": {
            "data": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
            "name": {"type": "string"},
            "flag": {"type": "boolean"},
            "n": {"type": "integer"},
            "none": {"nullable": True},
        },
    }


def test_module_json_samples() -> None:
    info = ModuleInfo(name="m", input_sample={"data": [[1.0, 2.0]]}, output_sample=[3])
    schemas = schemas_from_samples(info)
    assert schemas.source == "module.json"
    assert schemas.request is not None and schemas.request["example"] == {"data": [[1.0, 2.0]]}
    assert schemas.response == {"type": "array", "items": {"type": "integer"}, "example": [3]}
    assert schemas_from_samples(ModuleInfo(name="m")).source == "none"


def test_specs_single_input_uses_data_and_fixed_dimensions() -> None:
    schemas = schemas_from_specs(
        [TensorSpec("x", "FP32", (None, 2))],
        [TensorSpec("label", "INT64", (None,)), TensorSpec("p", "FP32", (None, 3))],
    )
    assert schemas.request is not None and schemas.response is not None
    data = schemas.request["properties"]["data"]
    assert data["items"] == {"type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 2}
    assert schemas.request["example"] == {"data": [[0.0, 0.0]]}
    assert schemas.response["example"] == {"outputs": {"label": [0], "p": [[0.0, 0.0, 0.0]]}}


def test_specs_several_inputs_use_inputs() -> None:
    schemas = schemas_from_specs(
        [TensorSpec("a", "INT64", (1,)), TensorSpec("b", "BYTES", (None,))], [TensorSpec("y", "BOOL", ())]
    )
    assert schemas.request is not None
    assert schemas.request["example"] == {"inputs": {"a": [0], "b": [""]}}


def test_document_security_and_routes() -> None:
    schemas = schemas_from_samples(ModuleInfo(name="m", input_sample={"data": [1]}))
    doc = build_document(title="m", version="2", schemas=schemas, models=["m"], secured=True, infer=False)
    assert doc["openapi"].startswith("3.")
    assert doc["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    score = doc["paths"]["/score"]["post"]
    assert score["security"] == [{"bearer": []}]
    assert score["requestBody"]["content"]["application/json"]["schema"]["example"] == {"data": [1]}
    assert "401" in score["responses"]
    assert "/v2/models/m" in doc["paths"] and "/v2/models/m/infer" not in doc["paths"]
