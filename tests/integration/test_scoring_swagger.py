"""A module's /swagger.json says what its server does: every route, and bodies it accepts or refuses.

The document is checked against the real scoring server (in-process aiohttp, loopback): every route
the app serves is documented, every documented GET answers a documented status with a body its
schema accepts, the documented /score example scores, and a body the schema forbids is refused.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import validate

from modules.scoring.app import ScoringApp
from modules.scoring.config import load_config
from modules.scoring.openapi import build_document
from modules.scoring.server import create_service
from modules.scoring.service import ApiSchemas
from tests.integration.scoring_helpers import digits_model

# /score also answers GET (a hint) and OPTIONS (CORS); the document describes the scoring POST.
UNDOCUMENTED = {("GET", "/score"), ("OPTIONS", "/score"), ("HEAD", "*")}


def _schema(operation: dict[str, Any], status: str) -> dict[str, Any] | None:
    content = operation["responses"][status].get("content", {})
    return content.get("application/json", {}).get("schema")


async def test_swagger_documents_every_route_and_the_bodies_the_server_takes(tmp_path: Path) -> None:
    model, _ = digits_model(tmp_path / "digits" / "1")
    config = load_config({"MODULE_JSON": str(tmp_path / "none.json"), "MODEL_DIR": str(model.parent)}, [])
    scoring = ScoringApp(config, create_service(config, script_module="swagger_test_entry"))
    app = scoring.application()
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        await scoring.load()
        document = await (await client.get("/swagger.json")).json()
        validate(document)
        paths = document["paths"]

        served = {
            (route.method, re.sub(r"\{name\}", "digits", route.resource.canonical))
            for route in app.router.routes()
            if route.resource is not None
        }
        missing = {
            (method, path)
            for method, path in served
            if (method, path) not in UNDOCUMENTED
            and (method, "*") not in UNDOCUMENTED
            and method.lower() not in paths.get(path, {})
        }
        assert not missing, f"served but not in /swagger.json: {sorted(missing)}"

        for path, operations in paths.items():
            if "get" not in operations:
                continue
            reply = await client.get(path)
            assert str(reply.status) in operations["get"]["responses"], (path, reply.status)
            schema = _schema(operations["get"], str(reply.status))
            if schema is not None:
                OAS30Validator(schema).validate(await reply.json())

        score = paths["/score"]["post"]
        request_schema = score["requestBody"]["content"]["application/json"]["schema"]
        reply = await client.post("/score", json=request_schema["example"])
        assert reply.status == 200, await reply.text()
        OAS30Validator(_schema(score, "200") or {}).validate(await reply.json())

        empty = {"data": []}
        assert not OAS30Validator(request_schema).is_valid(empty)
        refused = await client.post("/score", json=empty)
        assert refused.status == 400 and str(refused.status) in score["responses"]
    finally:
        await client.close()


@pytest.mark.parametrize("path", ["/v2", "/v2/health/live", "/v2/models/digits/ready"])
def test_open_inference_routes_are_listed(path: str) -> None:
    doc = build_document(
        title="m", version="1", schemas=ApiSchemas(), models=["digits"], secured=False, infer=True
    )
    assert "200" in doc["paths"][path]["get"]["responses"]
