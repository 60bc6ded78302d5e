"""The operator REST API against a real aiohttp server on a free loopback port and a SQLite data dir.

Routes call the same operations as ``edgectl``; these tests check the HTTP layer end to end: auth,
each route, JSON errors with the right status, uploads and downloads, publishing to a real
Mosquitto, the background controller ingesting what a real agent reports, and ``edgectl serve``
itself as a subprocess (token generated once, mode 0600, ``$EDGE_API_TOKEN``).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
import subprocess
import sys
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import paho.mqtt.client as mqtt
import pytest
import yaml
from aiohttp.multipart import content_disposition_filename, parse_content_disposition
from aiohttp.test_utils import TestClient, TestServer
from paho.mqtt.enums import CallbackAPIVersion

from agent.agent import Agent
from agent.config import load_agent_config
from agent.link import Link
from agent.runtime.process import ProcessRuntime
from cloud.api import Services, create_app
from cloud.api.auth import TOKEN_ENV, Tokens
from cloud.broker import BrokerPaths
from cloud.config import resolve_settings
from edgemqtt.endpoint import Endpoint
from modules.signing import load_public_key
from tests.integration.test_base_image import cpu_base_or_skip
from tests.integration.test_packaging import train_digits
from tests.services import REPO_ROOT, MosquittoBroker, free_port, http_status, wait_until

TOKEN = "test-token-0123456789abcdef"
WAIT_S = 30.0
PACKAGE_WAIT_S = 600.0


@dataclass
class Api:
    """A running API server, its client and token."""

    client: TestClient
    services: Services
    data_dir: Path

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    async def call(self, method: str, path: str, expect: int, **kw: Any) -> Any:
        """Send an authenticated request; assert the status; return the JSON body (or text)."""
        headers = {**self.auth, **kw.pop("headers", {})}
        async with self.client.request(method, path, headers=headers, **kw) as r:
            body = await r.text()
            assert r.status == expect, f"{method} {path}: {r.status} {body}"
            return json.loads(body) if r.content_type == "application/json" else body

    async def error(self, method: str, path: str, expect: int, **kw: Any) -> dict[str, Any]:
        """Like ``call`` for an error: checks the JSON error shape and returns it."""
        body = await self.call(method, path, expect, **kw)
        assert isinstance(body, dict) and set(body) == {"error", "detail", "request_id"}, body
        assert isinstance(body["error"], str) and body["error"]
        return body


async def _start(tmp_path: Path, endpoint: Endpoint, **app_options: Any) -> AsyncIterator[Api]:
    data_dir = tmp_path / "data"
    upload_max = app_options.pop("upload_max", 1024 * 1024)
    services = Services.open(resolve_settings(data_dir, env={}), endpoint, upload_max=upload_max)
    app = create_app(services, Tokens((TOKEN.encode(),), "test"), **app_options)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield Api(client, services, data_dir)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    """The API with no broker listening (publishing fails; states stay pending)."""
    async for started in _start(tmp_path, Endpoint.parse(f"mqtt://127.0.0.1:{free_port()}")):
        yield started


@pytest.fixture
async def api_broker(tmp_path: Path, mosquitto: MosquittoBroker) -> AsyncIterator[Api]:
    """The API publishing to a real Mosquitto, with the rollout controller running."""
    endpoint = Endpoint.parse(f"mqtt://127.0.0.1:{mosquitto.port}")
    async for started in _start(tmp_path, endpoint, controller_interval_s=0.2):
        yield started


def manifest(name: str = "vision", **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": name,
        "target": {"tags": {"site": "a"}},
        "modules": {"detector": {"images": {"cpu": "127.0.0.1:5000/det:1-cpu"}}},
    }
    doc.update(fields)
    return doc


async def add_device(api: Api, device_id: str = "pump-1", **fields: Any) -> dict[str, Any]:
    body = {"id": device_id, "tags": {"site": "a"}, **fields}
    return await api.call("POST", "/devices", 201, json=body)


async def upload(api: Api, name: str, data: bytes, filename: str = "model.onnx", query: str = "") -> Any:
    return await api.call(
        "POST",
        f"/models/{name}?filename={filename}{query}",
        201,
        data=data,
        headers={"Content-Type": "application/octet-stream"},
    )


# ---- auth, health, errors -----------------------------------------------------------------------


async def test_public_routes_and_token_required(api: Api) -> None:
    async with api.client.get("/healthz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"
    async with api.client.get("/openapi.json") as r:
        assert r.status == 200 and (await r.json())["openapi"].startswith("3.")
    for path in ("/models", "/devices", "/deployments", "/status", "/no-such-route"):
        async with api.client.get(path) as r:
            body = await r.json()
            assert r.status == 401, path
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert body["error"].startswith("authentication required")
    for header in ("Bearer wrong-token-0123456789", f"Basic {TOKEN}", "Bearer", TOKEN):
        async with api.client.get("/models", headers={"Authorization": header}) as r:
            assert r.status == 401, header
    async with api.client.get("/models", headers={"Authorization": f"bearer {TOKEN}"}) as r:
        assert r.status == 200 and await r.json() == []


async def test_request_id_is_echoed_and_in_errors(api: Api) -> None:
    async with api.client.get("/models/nope", headers={**api.auth, "X-Request-Id": "abc-123"}) as r:
        assert r.status == 404
        assert r.headers["X-Request-Id"] == "abc-123"
        assert (await r.json())["request_id"] == "abc-123"
    async with api.client.get("/models", headers={**api.auth, "X-Request-Id": "bad id with spaces"}) as r:
        assert r.status == 200 and len(r.headers["X-Request-Id"]) == 32


async def test_unknown_route_and_method_are_json(api: Api) -> None:
    body = await api.error("GET", "/nothing/here", 404)
    assert body["error"] == "no route GET /nothing/here"
    async with api.client.put("/models", headers=api.auth) as r:
        assert r.status == 405 and "GET" in r.headers["Allow"]
        assert set(await r.json()) == {"error", "detail", "request_id"}


async def test_openapi_document_matches_the_router(api: Api) -> None:
    async with api.client.get("/openapi.json") as r:
        doc = await r.json()
    served = set()
    for route in api.client.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or re.sub(r"\{(\w+):[^}]+\}", r"{\1}", info.get("formatter", ""))
        dashboard = (route.resource.name or "").startswith("dashboard_")  # HTML pages, not the API
        if route.method != "HEAD" and not dashboard:
            served.add((path, route.method.lower()))
    documented = {(path, method) for path, item in doc["paths"].items() for method in item}
    assert served == documented


# ---- models --------------------------------------------------------------------------------------


async def test_model_register_list_show_download_delete(api: Api) -> None:
    view = await upload(api, "iris", b"onnx-bytes", query="&tag=stage=dev&description=first")
    assert (view["name"], view["version"], view["framework"]) == ("iris", 1, "onnx")
    assert view["tags"] == {"stage": "dev"} and view["description"] == "first"
    assert [f["path"] for f in view["files"]] == ["model.onnx"]

    form = aiohttp.FormData()
    form.add_field("files", b"<xml/>", filename="ir/model.xml")
    form.add_field("files", b"weights", filename="ir/model.bin")
    form.add_field("tag", "stage=prod")
    form.add_field("description", "openvino IR")
    second = await api.call("POST", "/models/iris", 201, data=form)
    assert second["version"] == 2 and second["framework"] == "openvino"
    assert sorted(f["path"] for f in second["files"]) == ["ir/model.bin", "ir/model.xml"]
    again = aiohttp.FormData()
    again.add_field("files", b"<xml/>", filename="ir/model.xml")
    again.add_field("files", b"weights", filename="ir/model.bin")
    same = await api.call("POST", "/models/iris?if_changed=1", 200, data=again)
    assert (same["version"], same["created"], same["identical_to"]) == (2, False, 2), "nothing new stored"

    listed = await api.call("GET", "/models", 200)
    assert [(v["name"], v["version"]) for v in listed] == [("iris", 1), ("iris", 2)]
    prod = await api.call("GET", "/models?tag=stage=prod", 200)
    assert [v["version"] for v in prod] == [2]
    assert (await api.call("GET", "/models/iris", 200))["version"] == 2
    assert (await api.call("GET", "/models/iris/latest", 200))["version"] == 2
    assert (await api.call("GET", "/models/iris/1", 200))["files"][0]["size"] == len(b"onnx-bytes")

    async with api.client.get("/models/iris/2/files/ir/model.bin", headers=api.auth) as r:
        assert r.status == 200 and await r.read() == b"weights"
        expected = next(f["sha256"] for f in second["files"] if f["path"] == "ir/model.bin")
        assert r.headers["X-Content-SHA256"] == expected

    deleted = await api.call("DELETE", "/models/iris/1", 200)
    assert deleted["versions"] == [1] and deleted["blobs_removed"] == 1
    await api.error("GET", "/models/iris/1", 404)
    gone = await api.call("DELETE", "/models/iris", 200)
    assert gone["versions"] == [2]
    await api.error("GET", "/models/iris", 404)
    assert await api.call("GET", "/models", 200) == []


async def test_model_errors(api: Api) -> None:
    raw = {"Content-Type": "application/octet-stream"}
    body = await api.error(
        "POST", "/models/iris?filename=m.onnx", 415, data=b"x", headers={"Content-Type": "text/plain"}
    )
    assert "application/octet-stream" in body["error"]
    body = await api.error("POST", "/models/Bad Name?filename=m.onnx", 400, data=b"x", headers=raw)
    assert body["error"].startswith("invalid model name")
    body = await api.error("POST", "/models/iris", 400, data=b"x", headers=raw)
    assert "file name is required" in body["error"]
    body = await api.error("POST", "/models/iris?filename=../evil", 400, data=b"x", headers=raw)
    assert "relative path" in body["error"]
    body = await api.error(
        "POST", "/models/iris?filename=m.onnx&framework=keras", 400, data=b"x", headers=raw
    )
    assert "unknown framework 'keras'" in body["error"]
    body = await api.error("POST", "/models/iris?filename=m.onnx&tag=novalue", 400, data=b"x", headers=raw)
    assert "KEY=VALUE" in body["error"]
    body = await api.error(
        "POST", "/models/iris?filename=big.bin", 413, data=b"x" * (1024 * 1024 + 1), headers=raw
    )
    assert "limit" in body["error"]

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(20):
            yield b"y" * 65536

    body = await api.error("POST", "/models/iris?filename=big.bin", 413, data=chunks(), headers=raw)
    assert body["error"] == "upload is over the limit of 1048576 bytes"
    assert await api.call("GET", "/models", 200) == []
    assert list((api.data_dir / "uploads").iterdir()) == []

    await upload(api, "iris", b"v1")
    body = await api.error("GET", "/models/iris/7", 404)
    assert body["error"] == "model 'iris' has no version 7 (versions: 1)"
    body = await api.error("GET", "/models/iris/seven", 400)
    assert "expected a number from 1" in body["error"]
    body = await api.error("GET", "/models/iris/1/files/other.onnx", 404)
    assert body["detail"] == {"files": ["model.onnx"]}
    await api.error("DELETE", "/models/iris/latest", 400)
    await api.error("DELETE", "/models/nope/1", 404)


async def test_upload_names_that_clash_or_could_break_headers_are_refused(api: Api) -> None:
    for first, second in (("a/b.bin", "a"), ("a", "a/b.bin")):  # a file and a folder of the same name
        form = aiohttp.FormData()
        form.add_field("files", b"1", filename=first)
        form.add_field("files", b"2", filename=second)
        body = await api.error("POST", "/models/iris", 400, data=form)
        assert "clashes with another file" in body["error"], body
    raw = {"Content-Type": "application/octet-stream"}
    for name, why in (
        ("m\r\nX-Evil: 1.onnx", "'\\r': control characters"),
        ('m".onnx', "'\"': control characters"),
        ("m\x00.onnx", "'\\x00': control characters"),
        ("x" * 256, "is too long"),
    ):
        body = await api.error("POST", f"/models/iris?filename={quote(name)}", 400, data=b"x", headers=raw)
        assert why in body["error"], body
    assert await api.call("GET", "/models", 200) == []
    assert list((api.data_dir / "uploads").iterdir()) == []


async def test_malformed_multipart_is_a_400_naming_the_problem(api: Api) -> None:
    def part(headers: str, body: str = "x") -> bytes:
        return f"--B\r\n{headers}\r\n\r\n{body}\r\n--B--\r\n".encode()

    disposition = 'Content-Disposition: form-data; name="files"; filename="m.onnx"'
    for content_type, body, why in (
        ("multipart/form-data", part(disposition), "needs a boundary parameter"),
        ("multipart/form-data; boundary=" + "b" * 71, part(disposition), "needs a boundary parameter"),
        ("multipart/form-data; boundary=B", part("X-Nothing: 1"), "no usable Content-Disposition"),
        ("multipart/form-data; boundary=B", part(disposition + "\r\nno colon here"), "bad part header"),
        ("multipart/form-data; boundary=B", part(disposition)[:-12], "truncated"),
        ("multipart/form-data; boundary=B", b"--B\r\n" + disposition.encode() + b"\r\n\r\nxx", "truncated"),
        (
            "multipart/form-data; boundary=B",
            part(disposition + "\r\nContent-Transfer-Encoding: base64", "eA=="),
            "encoded parts are not supported",
        ),
        ("multipart/form-data; boundary=B", b"--B--\r\n", "holds no file part"),
    ):
        headers = {"Content-Type": content_type}
        error = await api.error("POST", "/models/iris", 400, data=body, headers=headers)
        assert why in error["error"], (content_type, body, error)
    assert await api.call("GET", "/models", 200) == []
    assert list((api.data_dir / "uploads").iterdir()) == []


async def test_download_names_the_file_in_a_header_that_survives_its_name(api: Api, tmp_path: Path) -> None:
    name = 'café "v2"; x=1.onnx'  # registered from a folder, where no upload rule applied
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / name).write_bytes(b"weights")
    await asyncio.to_thread(api.services.registry.register, folder, "odd")
    async with api.client.get(f"/models/odd/1/files/{quote(name)}", headers=api.auth) as r:
        assert r.status == 200 and await r.read() == b"weights", await r.text()
        header = r.headers["Content-Disposition"]
    assert header == (
        "attachment; filename=\"caf___v2___x_1.onnx\"; filename*=UTF-8''caf%C3%A9%20%22v2%22%3B%20x%3D1.onnx"
    )
    kind, params = parse_content_disposition(header)
    assert (kind, content_disposition_filename(params, "filename")) == ("attachment", name)


async def test_model_in_use_cannot_be_deleted(api: Api) -> None:
    await upload(api, "digits", b"onnx")
    await add_device(api)
    await api.call("POST", "/deployments?model=digits:1", 201, json=manifest())
    assert (await api.call("GET", "/models/digits/1", 200))["deployments"] == ["vision"]
    body = await api.error("DELETE", "/models/digits/1", 409)
    assert "used by deployment 'vision'" in body["error"]
    await api.error("DELETE", "/models/digits", 409)
    await api.call("DELETE", "/deployments/vision", 200)
    await api.call("DELETE", "/models/digits/1", 200)


# ---- devices -------------------------------------------------------------------------------------


async def test_device_add_list_show_tag_remove(api: Api) -> None:
    added = await add_device(api, "pump-1", profile="cpu", show_password=True)
    assert added["device"]["id"] == "pump-1" and added["device"]["tags"] == {"site": "a"}
    password = added["password"]
    assert isinstance(password, str) and len(password) >= 16
    config = await api.call("GET", "/devices/pump-1/agent-config", 200)
    parsed = yaml.safe_load(config)
    assert parsed["device_id"] == "pump-1" and parsed["broker"]["password"] == password
    quiet = await add_device(api, "pump-2", tags={"site": "b"})
    assert quiet["password"] is None
    passwords = BrokerPaths.of(api.data_dir).password_file.read_text()
    assert "pump-1:" in passwords and password not in passwords

    body = await api.error("POST", "/devices", 409, json={"id": "pump-1"})
    assert "already exists" in body["error"]
    assert [d["id"] for d in await api.call("GET", "/devices", 200)] == ["pump-1", "pump-2"]
    assert [d["id"] for d in await api.call("GET", "/devices?tag=site=b", 200)] == ["pump-2"]
    assert await api.call("GET", "/devices?profile=cuda", 200) == []
    assert (await api.call("GET", "/devices/pump-1", 200))["profile"] == "cpu"

    tagged = await api.call(
        "PATCH", "/devices/pump-1", 200, json={"set": {"ring": "canary"}, "remove": ["site"]}
    )
    assert tagged["tags"] == {"ring": "canary"}
    body = await api.error("PATCH", "/devices/pump-1", 400, json={"remove": ["site"]})
    assert body["error"] == "device 'pump-1' has no tag 'site'"

    removed = await api.call("DELETE", "/devices/pump-1", 200)
    assert removed["removed"]["id"] == "pump-1" and "broker" in removed
    await api.error("GET", "/devices/pump-1", 404)
    await api.error("DELETE", "/devices/pump-1", 404)
    assert "pump-1:" not in BrokerPaths.of(api.data_dir).password_file.read_text()


async def test_device_input_errors(api: Api) -> None:
    body = await api.error(
        "POST", "/devices", 400, json={"id": "pump-1", "tags": {"site": 3}, "colour": "red"}
    )
    locs = {d["loc"] for d in body["detail"]}
    assert locs == {"tags.site", "colour"}
    body = await api.error("POST", "/devices", 400, json={"id": "Pump 1"})
    assert body["error"].startswith("invalid device id")
    body = await api.error("POST", "/devices", 400, json={"id": "pump-1", "profile": "jetson"})
    assert "jetson" in body["error"]
    body = await api.error(
        "POST", "/devices", 400, data="{not json", headers={"Content-Type": "application/json"}
    )
    assert body["detail"][0]["loc"] == "(body)"
    await api.error("POST", "/devices", 415, data="id: x", headers={"Content-Type": "application/yaml"})
    await api.error("GET", "/devices/Not_Valid!", 400)
    await api.error("GET", "/devices?tag=site", 400)
    assert await api.call("GET", "/devices", 200) == []


# ---- deployments ---------------------------------------------------------------------------------


async def test_deployment_apply_list_show_status_delete(api: Api) -> None:
    await add_device(api, "pump-1")
    await add_device(api, "pump-2")
    created = await api.call("POST", "/deployments", 201, json=manifest(rollout={"waves": [1, "100%"]}))
    assert created["created"] and created["selected"] == 2 and created["waves"] == [1, 1]
    assert created["publish"]["published"] == 0 and created["publish"]["pending"] == 1
    assert "cannot reach the MQTT broker" in created["publish"]["error"]
    again = await api.call("POST", "/deployments", 200, json=manifest(rollout={"waves": [1, "100%"]}))
    assert not again["created"] and not again["manifest_changed"] and again["new_generations"] == 0

    text = yaml.safe_dump(manifest("other", priority=-1, target={"device_ids": ["pump-2"]}))
    other = await api.call(
        "POST", "/deployments", 201, data=text, headers={"Content-Type": "application/yaml"}
    )
    assert other["winning"] == 0

    listed = await api.call("GET", "/deployments", 200)
    assert [(d["name"], d["devices"]) for d in listed] == [("other", 0), ("vision", 1)]
    shown = await api.call("GET", "/deployments/vision", 200)
    assert shown["manifest"]["name"] == "vision" and shown["models"] == []
    status = await api.call("GET", "/deployments/vision/status", 200)
    assert status["rollout_state"] == "rolling" and len(status["waves"]) == 2
    assert {d["device"]: d["status"] for d in status["devices"]}["pump-2"] == "waiting"
    server = await api.call("GET", "/status", 200)
    assert server["pending_desired_states"] == 1 and server["controller"]["enabled"] is False
    await api.error("POST", "/desired-states/publish", 503)

    deleted = await api.call("DELETE", "/deployments/vision", 200)
    assert deleted["deployment"] == "vision"
    await api.error("GET", "/deployments/vision", 404)
    await api.error("GET", "/deployments/vision/status", 404)
    await api.error("DELETE", "/deployments/vision", 404)


async def test_deployment_dry_run_revisions_rollback_and_resume(api: Api) -> None:
    await add_device(api, "pump-1")
    await api.call("POST", "/deployments", 201, json=manifest())
    v2 = manifest(modules={"detector": {"images": {"cpu": "127.0.0.1:5000/det:2-cpu"}}})
    dry = await api.call("POST", "/deployments?dry_run=1", 200, json=v2)
    assert dry["dry_run"] and dry["manifest_changed"] and dry["revision"] is None
    assert "+      cpu: 127.0.0.1:5000/det:2-cpu" in dry["diff"]
    shown = await api.call("GET", "/deployments/vision", 200)
    assert shown["manifest"]["modules"]["detector"]["images"]["cpu"] == "127.0.0.1:5000/det:1-cpu"
    applied = await api.call("POST", "/deployments", 200, json=v2)
    assert applied["revision"] == 2 and not applied["dry_run"]

    revisions = await api.call("GET", "/deployments/vision/revisions", 200)
    assert [(r["number"], r["current"]) for r in revisions] == [(1, False), (2, True)]
    back = await api.call("POST", "/deployments/vision/rollback", 200)
    assert (back["rolled_back_to"], back["revision"]) == (1, 3)
    assert "+      cpu: 127.0.0.1:5000/det:1-cpu" in back["diff"]
    await api.error("POST", "/deployments/vision/rollback?to=9", 404)
    await api.error("POST", "/deployments/vision/rollback?to=x", 400)
    await api.error("POST", "/deployments?dry_run=maybe", 400, json=v2)
    resumed = await api.call("POST", "/deployments/vision/resume", 200)
    assert resumed["result"].endswith("not halted: nothing to resume")
    retried = await api.call("POST", "/deployments/vision/retry", 200)
    assert retried["result"].endswith("0 failed or rolled-back device(s) get a new generation")
    await api.error("POST", "/deployments/nope/resume", 404)


async def test_credentials_set_list_rotate_and_remove_never_show_the_password(api: Api) -> None:
    secret = "Very-Secret-" + uuid.uuid4().hex
    body = {"registry": "reg.example:5000", "username": "puller", "password": secret}
    created = await api.call("PUT", "/credentials/site", 201, json=body)
    assert (created["revision"], created["created"]) == (1, True)
    again = await api.call("PUT", "/credentials/site", 200, json={**body, "password": secret + "2"})
    assert (again["revision"], again["created"]) == (2, False)
    listed = await api.call("GET", "/credentials", 200)
    assert [(c["name"], c["registry"], c["username"], c["revision"]) for c in listed] == [
        ("site", "reg.example:5000", "puller", 2)
    ]
    assert secret not in json.dumps(listed)
    bad = await api.error("PUT", "/credentials/site", 400, json={"registry": "r", "username": "u"})
    assert "password" in json.dumps(bad["detail"])
    await add_device(api, "pump-1")
    await api.call("POST", "/deployments", 201, json=manifest(registry_credentials=["site"]))
    busy = await api.error("DELETE", "/credentials/site", 409)
    assert "used by deployment(s) vision" in busy["error"]
    await api.call("DELETE", "/deployments/vision", 200)
    assert await api.call("DELETE", "/credentials/site", 200) == {"removed": "site"}
    await api.error("DELETE", "/credentials/site", 404)


async def test_deployment_errors(api: Api) -> None:
    await add_device(api)
    body = await api.error("POST", "/deployments", 400, json=manifest(modules={}, priority=5000))
    assert {d["loc"] for d in body["detail"]} == {"modules", "priority"}
    body = await api.error("POST", "/deployments", 400, json=manifest(target={}))
    assert "target selects nothing" in body["error"]
    body = await api.error(
        "POST", "/deployments", 400, json=manifest(modules={"m": {"images": {"jetson": "reg.local/m:1"}}})
    )
    assert "unknown device profile 'jetson'" in body["error"]
    body = await api.error("POST", "/deployments", 400, json=manifest(target={"tags": {"site": "zzz"}}))
    assert "selects no provisioned device" in body["error"]
    dup = "name: a\nname: b\n"
    body = await api.error(
        "POST", "/deployments", 400, data=dup, headers={"Content-Type": "application/yaml"}
    )
    assert "duplicate key 'name'" in body["error"]
    await api.error("POST", "/deployments", 400, data="[1, 2]", headers={"Content-Type": "application/json"})
    await api.error("POST", "/deployments", 415, data="x", headers={"Content-Type": "text/plain"})
    body = await api.error("POST", "/deployments?model=digits", 400, json=manifest())
    assert "NAME:VERSION" in body["error"]
    body = await api.error("POST", "/deployments?model=digits:1", 404, json=manifest())
    assert "digits" in body["error"]
    big = json.dumps({**manifest(), "pad": "x" * (1024 * 1024)})
    await api.error("POST", "/deployments", 413, data=big, headers={"Content-Type": "application/json"})
    assert await api.call("GET", "/deployments", 200) == []


# ---- packages -----------------------------------------------------------------------------------


async def wait_job(api: Api, job_id: str) -> dict[str, Any]:
    """Poll a packaging job until it finished; fail with its log after PACKAGE_WAIT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PACKAGE_WAIT_S
    while True:
        job = await api.call("GET", f"/packages/{job_id}", 200)
        if job["state"] in ("succeeded", "failed"):
            return job
        if loop.time() > deadline:
            pytest.fail(f"packaging job {job_id} still {job['state']}; log:\n" + "\n".join(job["log"]))
        await asyncio.sleep(0.5)


async def test_package_request_errors(api: Api) -> None:
    body = await api.error("POST", "/packages", 400, json={"models": ["Digits:x"], "profiles": []})
    assert {d["loc"] for d in body["detail"]} == {"models.0", "profiles"}
    body = await api.error("POST", "/packages", 404, json={"models": ["digits"], "profiles": ["cpu"]})
    assert body["error"] == "model 'digits' is not registered"
    await upload(api, "digits", b"not really onnx")
    body = await api.error("POST", "/packages", 400, json={"models": ["digits:1"], "profiles": ["jetson"]})
    assert "jetson" in body["error"]
    await api.error("GET", "/packages/nope", 404)
    assert await api.call("GET", "/packages", 200) == []


async def test_package_job_failure_is_recorded(api: Api) -> None:
    await upload(api, "digits", b"onnx bytes")
    closed = f"127.0.0.1:{free_port()}"
    job = await api.call(
        "POST", "/packages", 202, json={"models": ["digits:1"], "profiles": ["cpu"], "registry": closed}
    )
    assert job["state"] in ("queued", "running") and job["request"]["registry"] == closed
    done = await wait_job(api, job["id"])
    assert done["state"] == "failed" and closed in done["error"], done
    assert [j["id"] for j in await api.call("GET", "/packages", 200)] == [job["id"]]


async def test_package_job_builds_and_pushes(
    api: Api, registry: Any, docker_client: Any, tmp_path: Path
) -> None:
    base = await asyncio.to_thread(cpu_base_or_skip, registry, docker_client)
    assert base.startswith(registry.address)
    model = await asyncio.to_thread(train_digits, tmp_path / "digits", (32,), 0)
    await upload(api, "digits", (model / "model.onnx").read_bytes())
    sample = {"data": [[0.0] * 64]}
    body = {"models": ["digits:1"], "profiles": ["cpu"], "registry": registry.address, "input_sample": sample}
    job = await api.call("POST", "/packages", 202, json=body)
    done = await wait_job(api, job["id"])
    assert done["state"] == "succeeded", done["error"]
    [image] = done["results"]
    assert image["profile"] == "cpu" and image["module"] == "digits" and image["version"] == "1"
    assert image["image"].startswith(f"{registry.address}/digits@sha256:")
    assert [layer["name"] for layer in image["layers"]] == ["runtime", "models"]
    assert done["log"], "the job kept no progress lines"


# ---- with a real broker, the controller and a real agent ------------------------------------------


def retained(port: int, topic: str) -> bytes | None:
    """The retained message on ``topic`` (None when there is none), read with a fresh client."""
    got: list[bytes] = []
    done = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"test-{uuid.uuid4().hex[:8]}")
    client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
    client.on_subscribe = lambda *_: threading.Timer(1.0, done.set).start()

    def on_message(_c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        got.append(bytes(message.payload))
        done.set()

    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        done.wait(WAIT_S)
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0] if got else None


async def wait_for(api: Api, path: str, check: Any, what: str) -> Any:
    """Poll ``GET path`` until ``check(body)`` holds; fail naming ``what`` after WAIT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while True:
        body = await api.call("GET", path, 200)
        if check(body):
            return body
        if loop.time() > deadline:
            pytest.fail(f"{what}: last {path} answer was {body}")
        await asyncio.sleep(0.1)


def device_status(body: dict[str, Any], device: str) -> str:
    return next((d["status"] for d in body["devices"] if d["device"] == device), "missing")


async def test_publish_controller_and_agent_round_trip(
    api_broker: Api, mosquitto: MosquittoBroker, tmp_path: Path
) -> None:
    api = api_broker
    await wait_for(api, "/status", lambda b: b["controller"]["connected"], "controller connected")
    added = await add_device(
        api,
        "pump-1",
        broker_url=f"mqtt://127.0.0.1:{mosquitto.port}",
        runtime="process",
        state_dir=str(tmp_path / "agent-state"),
    )
    applied = await api.call("POST", "/deployments", 201, json=manifest())
    assert applied["publish"] == {"published": 1, "pending": 0, "error": None}
    desired = retained(mosquitto.port, "edge/pump-1/desired")
    assert desired is not None and json.loads(desired)["device_id"] == "pump-1"
    status = await api.call("GET", "/deployments/vision/status", 200)
    assert device_status(status, "pump-1") == "pending"

    config = load_agent_config(added["config_file"])
    public_key = load_public_key(config.cloud_public_key.read_bytes())
    runtime = ProcessRuntime(config.state_dir, tmp_path / "images", stop_timeout_s=5)
    async with Link(config) as link:
        agent = Agent(config, runtime, link, public_key=public_key, accelerators=[])
        task = asyncio.create_task(agent.run())
        try:
            body = await wait_for(
                api,
                "/deployments/vision/status",
                lambda b: device_status(b, "pump-1") not in ("pending", "offline"),
                "the agent's report ingested by the controller",
            )
            assert device_status(body, "pump-1") in ("applying", "failed", "rolled back")
            error = await api.error("GET", "/devices/pump-1/modules/nope/logs?tail=5", 502)
            assert "not in the desired state" in error["error"] and error["detail"]["ok"] is False
        finally:
            agent.stop()
            await asyncio.wait_for(task, WAIT_S)
            await runtime.close()
    await wait_for(
        api, "/deployments/vision/status", lambda b: device_status(b, "pump-1") == "offline", "agent offline"
    )
    error = await api.error("POST", "/devices/pump-1/modules/detector/restart", 409)
    assert "offline since" in error["error"]
    server = await api.call("GET", "/status", 200)
    assert server["controller"]["ingest"]["written"] >= 2 and server["controller"]["passes"] >= 1


async def test_commands_without_an_answer(api_broker: Api) -> None:
    api = api_broker
    await api.error("GET", "/devices/ghost/modules/web/logs", 404)
    await add_device(api, "quiet-1")
    error = await api.error("POST", "/devices/quiet-1/modules/web/restart?timeout=0.5", 504)
    assert "did not answer restart within 0.5 s" in error["error"]
    await api.error("GET", "/devices/quiet-1/modules/web/logs?tail=0", 400)
    await api.error("GET", "/devices/quiet-1/modules/web/logs?tail=1.5", 400)
    await api.error("GET", "/devices/quiet-1/modules/web/logs?timeout=forever", 400)


# ---- edgectl serve as a process -----------------------------------------------------------------


class Served:
    """``edgectl serve`` in a subprocess; ``lines`` is what it printed on stdout."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, *extra: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [
            sys.executable,
            "-m",
            "cloud.cli",
            "serve",
            "--data-dir",
            str(data_dir),
            "--port",
            str(self.port),
        ]
        self.proc = subprocess.Popen(
            [*argv, "--no-controller", *extra],
            cwd=REPO_ROOT,
            env={**os.environ, "EDGE_DB_URL": "", **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def wait_ready(self) -> None:
        if not wait_until(lambda: http_status(f"{self.url}/healthz") == 200, WAIT_S, self.alive):
            out, err = self.stop()
            pytest.fail(f"edgectl serve did not start: {out}\n{err}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> tuple[str, str]:
        if self.alive():
            self.proc.terminate()
        out, err = self.proc.communicate(timeout=WAIT_S)
        return out, err


def get(url: str, token: str | None) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=WAIT_S) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for s in started:
        s.stop()


def test_serve_generates_a_token_once(tmp_path: Path, served: list[Served]) -> None:
    data_dir = tmp_path / "data"
    first = Served(data_dir, {TOKEN_ENV: ""})
    served.append(first)
    first.wait_ready()
    token_file = data_dir / "api-tokens"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    token = token_file.read_text().splitlines()[-1]
    assert get(f"{first.url}/models", None) == 401
    assert get(f"{first.url}/models", token) == 200
    assert get(f"{first.url}/openapi.json", None) == 200
    out, _ = first.stop()
    assert first.proc.returncode == 0, "SIGTERM should end edgectl serve cleanly"
    assert token in out and "shown once" in out and f"listening on {first.url}" in out

    second = Served(data_dir, {TOKEN_ENV: ""})
    served.append(second)
    second.wait_ready()
    assert get(f"{second.url}/devices", token) == 200
    out, _ = second.stop()
    assert token not in out


def test_serve_token_from_environment_and_bad_tokens(tmp_path: Path, served: list[Served]) -> None:
    env_token = "from-the-environment-0123456789"
    s = Served(tmp_path / "data", {TOKEN_ENV: env_token})
    served.append(s)
    s.wait_ready()
    assert get(f"{s.url}/deployments", env_token) == 200
    assert get(f"{s.url}/deployments", "something-else-0123456789") == 401
    assert not (tmp_path / "data" / "api-tokens").exists()
    busy = Served(tmp_path / "data", {TOKEN_ENV: env_token}, "--port", str(s.port))
    served.append(busy)
    _out, err = busy.proc.communicate(timeout=WAIT_S)
    assert busy.proc.returncode == 1 and f"cannot listen on 127.0.0.1:{s.port}" in err
    s.stop()

    short = Served(tmp_path / "data", {TOKEN_ENV: "short"})
    served.append(short)
    _out, err = short.proc.communicate(timeout=WAIT_S)
    assert short.proc.returncode == 1 and "at least 16" in err

    open_file = tmp_path / "open-tokens"
    open_file.write_text("a-token-for-an-operator-123456\n")
    open_file.chmod(0o644)
    loose = Served(tmp_path / "data", {TOKEN_ENV: ""}, "--token-file", str(open_file))
    served.append(loose)
    _out, err = loose.proc.communicate(timeout=WAIT_S)
    assert loose.proc.returncode == 1 and "chmod 600" in err

    queue_only = Served(tmp_path / "data", {TOKEN_ENV: env_token}, "--reports-queue", "amqp://127.0.0.1:1/")
    served.append(queue_only)
    _out, err = queue_only.proc.communicate(timeout=WAIT_S)
    assert queue_only.proc.returncode == 2 and "cannot go with --no-controller" in err
