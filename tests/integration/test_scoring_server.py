"""The scoring server's routes, in process: real aiohttp server on loopback, real entry scripts and ONNX.

Process-level behaviour (start-up, exit codes, slow init, strict profiles) is in
``test_scoring_server_process.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from aiohttp.test_utils import TestClient, TestServer

from modules.scoring.app import ScoringApp
from modules.scoring.config import ServerConfig, load_config
from modules.scoring.server import create_service
from modules.scoring.tensors import INFERENCE_HEADER, decode_oip_response, encode_binary_request
from tests.integration.scoring_helpers import digits_linear_model, digits_model, write_script

_ids = itertools.count()
JSON = {"Content-Type": "application/json"}


@pytest.fixture(autouse=True)
def _restore_model_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Entry-script services set MODEL_DIR/AZUREML_MODEL_DIR; put them back after each test."""
    for var in ("MODEL_DIR", "AZUREML_MODEL_DIR"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """``<tmp>/digits/1/model.onnx`` and four sample rows."""
    root = tmp_path_factory.mktemp("models")
    return digits_model(root / "digits" / "1")


def _config(tmp_path: Path, **env: str) -> ServerConfig:
    return load_config({"MODULE_JSON": str(tmp_path / "no-module.json"), **env}, [])


@asynccontextmanager
async def serving(config: ServerConfig, *, load: bool = True) -> AsyncIterator[tuple[TestClient, ScoringApp]]:
    """The app for ``config`` on a loopback port, loaded unless ``load`` is False."""
    service = create_service(config, script_module=f"scoring_test_entry_{next(_ids)}")
    scoring = ScoringApp(config, service)
    client = TestClient(TestServer(scoring.application(), host="127.0.0.1"))
    await client.start_server()
    try:
        if load:
            assert await scoring.load(), scoring.readiness.reason()
        yield client, scoring
    finally:
        await client.close()


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    """A body sent with chunked transfer encoding (no Content-Length)."""
    for i in range(0, len(data), 100):
        yield data[i : i + 100]


async def _alive(client: TestClient) -> None:
    response = await client.get("/")
    assert (response.status, await response.text()) == (200, "Healthy")


async def _error(response: Any, status: int) -> str:
    assert response.status == status, await response.text()
    assert response.content_type == "application/json"
    body = await response.json()
    assert set(body) <= {"error", "request_id"}
    return str(body["error"])


ECHO_SCRIPT = """
    import json, threading
    started, release = threading.Event(), threading.Event()
    def init():
        pass
    def run(data, request_headers):
        doc = json.loads(data)
        if doc.get("fail"):
            raise RuntimeError("run() failed on purpose")
        if doc.get("wait"):
            started.set()
            release.wait()
        return {"got": doc, "type": type(data).__name__, "header": request_headers.get("X-Test")}
"""


# --------------------------------------------------------------------------------------------
# Entry-script mode, plain run(data)
# --------------------------------------------------------------------------------------------


async def test_plain_run_gets_the_body_as_str_and_headers(tmp_path: Path) -> None:
    script = write_script(tmp_path / "score.py", ECHO_SCRIPT)
    async with serving(_config(tmp_path, ENTRY_SCRIPT=str(script))) as (client, _):
        headers = {"X-Test": "yes", "Content-Type": "application/json"}
        response = await client.post("/score", data=b'{"a": [1, 2]}', headers=headers)
        assert response.status == 200
        assert response.headers["X-Request-Id"]
        assert await response.json() == {"got": {"a": [1, 2]}, "type": "str", "header": "yes"}
        json_typed = await client.post("/score", json={"b": 1})
        assert (await json_typed.json())["got"] == {"b": 1}


async def test_bad_input_is_4xx_and_the_server_lives_on(tmp_path: Path) -> None:
    script = write_script(tmp_path / "score.py", ECHO_SCRIPT)
    config = _config(tmp_path, ENTRY_SCRIPT=str(script), MAX_REQUEST_BYTES="1024")
    async with serving(config) as (client, _):
        cases = [
            (
                client.post("/score", data=b'{"a": ', headers={"Content-Type": "application/json"}),
                400,
                "not valid JSON",
            ),
            (client.post("/score", data=b"", headers=JSON), 400, "body is empty"),
            (
                client.post("/score", data=b'{"a": 1}', headers={"Content-Type": "text/html"}),
                415,
                "text/html",
            ),
            (
                client.post(
                    "/score", data=b"--x\r\n", headers={"Content-Type": "multipart/form-data; boundary=x"}
                ),
                415,
                "multipart/form-data",
            ),
            (
                client.post("/score", data=b"\xff\xfe", headers={"Content-Type": "text/plain"}),
                400,
                "not UTF-8",
            ),
            (
                client.post("/score", data=b'{"a": "' + b"x" * 2000 + b'"}', headers=JSON),
                413,
                "limit of 1024 bytes",
            ),
            (client.post("/score", data=_chunks(b"x" * 2000), headers=JSON), 413, "limit of 1024 bytes"),
            (client.post("/score", data=b"{}"), 415, "application/octet-stream"),
            (client.get("/score"), 405, "needs a raw-request"),
            (client.delete("/score"), 405, "DELETE is not allowed"),
            (client.get("/no/such/route"), 404, "no route /no/such/route"),
        ]
        for request, status, message in cases:
            assert message in await _error(await request, status)
            await _alive(client)
        missing_type = await client.post("/score", data=b'{"ok": 1}', skip_auto_headers={"Content-Type"})
        assert missing_type.status == 200, "a missing Content-Type is accepted, like Azure ML"
        text = await client.post("/score", data=b'{"ok": 2}', headers={"Content-Type": "text/plain"})
        assert (await text.json())["got"] == {"ok": 2}


async def test_run_raising_is_500_with_request_id_and_no_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    script = write_script(tmp_path / "score.py", ECHO_SCRIPT)
    async with serving(_config(tmp_path, ENTRY_SCRIPT=str(script))) as (client, _):
        response = await client.post("/score", json={"fail": True}, headers={"X-Request-Id": "req-42"})
        message = await _error(response, 500)
        assert "RuntimeError: run() failed on purpose" in message
        body = await response.json()
        assert body["request_id"] == "req-42"
        assert "Traceback" not in json.dumps(body)
        assert "req-42" in caplog.text and "Traceback" in caplog.text
        await _alive(client)
        assert (await client.post("/score", json={"fine": 1})).status == 200


async def test_timeout_is_504_and_counted(tmp_path: Path) -> None:
    script = write_script(tmp_path / "score.py", ECHO_SCRIPT)
    async with serving(_config(tmp_path, ENTRY_SCRIPT=str(script), SCORING_TIMEOUT="0.2")) as (
        client,
        scoring,
    ):
        module = scoring.service.script.module  # type: ignore[attr-defined]
        try:
            assert "SCORING_TIMEOUT" in await _error(await client.post("/score", json={"wait": True}), 504)
            await _alive(client)
            metrics = await (await client.get("/metrics")).text()
            assert 'scoring_request_errors_total{route="/score",reason="timeout"} 1' in metrics
            assert "scoring_inference_running 1" in metrics, "the timed-out run() still holds its thread"
        finally:
            module.release.set()
        assert (await client.post("/score", json={"after": 1})).status == 200


async def test_health_answers_while_a_long_run_is_in_flight(tmp_path: Path) -> None:
    script = write_script(tmp_path / "score.py", ECHO_SCRIPT)
    async with serving(_config(tmp_path, ENTRY_SCRIPT=str(script), SCORING_THREADS="1")) as (client, scoring):
        module = scoring.service.script.module  # type: ignore[attr-defined]
        long = asyncio.create_task(client.post("/score", json={"wait": True}))
        await asyncio.to_thread(module.started.wait)
        try:
            await _alive(client)
            assert (await client.get("/v2/health/live")).status == 200
            assert (await client.get("/v2/health/ready")).status == 200
            metrics = await (await client.get("/metrics")).text()
            assert "scoring_inference_running 1" in metrics
            assert not long.done(), "health answered before the long request finished"
        finally:
            module.release.set()
        assert (await long).status == 200


async def test_queue_limit_answers_503(tmp_path: Path) -> None:
    script = write_script(tmp_path / "score.py", ECHO_SCRIPT)
    config = _config(tmp_path, ENTRY_SCRIPT=str(script), SCORING_THREADS="1", SCORING_MAX_QUEUE="0")
    async with serving(config) as (client, scoring):
        module = scoring.service.script.module  # type: ignore[attr-defined]
        long = asyncio.create_task(client.post("/score", json={"wait": True}))
        await asyncio.to_thread(module.started.wait)
        try:
            busy = await client.post("/score", json={"x": 1})
            assert "busy" in await _error(busy, 503)
            assert busy.headers["Retry-After"] == "1"
        finally:
            module.release.set()
        assert (await long).status == 200


async def test_not_ready_until_loaded(tmp_path: Path) -> None:
    script = write_script(tmp_path / "score.py", ECHO_SCRIPT)
    async with serving(_config(tmp_path, ENTRY_SCRIPT=str(script)), load=False) as (client, scoring):
        ready = await client.get("/v2/health/ready")
        assert ready.status == 503
        assert "still initialising" in (await ready.json())["reason"]
        assert "not ready" in await _error(await client.post("/score", json={}), 503)
        assert (await client.get("/v2/models/score/ready")).status == 503
        await _alive(client)
        assert await scoring.load()
        assert (await client.get("/v2/health/ready")).status == 200
        assert (await client.get("/v2/models/score/ready")).status == 200


async def test_entry_script_metadata_and_infer_not_available(tmp_path: Path) -> None:
    script = write_script(tmp_path / "score.py", ECHO_SCRIPT)
    async with serving(_config(tmp_path, ENTRY_SCRIPT=str(script))) as (client, _):
        meta = await (await client.get("/v2/models/score")).json()
        assert meta["name"] == "score" and meta["platform"] == "python-entry-script"
        assert meta["parameters"]["execution_provider"] == "unknown"
        message = await _error(await client.post("/v2/models/score/infer", json={"inputs": []}), 404)
        assert "use POST /score" in message
        assert "no model 'other'" in await _error(await client.get("/v2/models/other"), 404)
        server = await (await client.get("/v2")).json()
        assert server["name"] == "edgedeploy-scoring" and server["extensions"] == []


# --------------------------------------------------------------------------------------------
# Entry scripts that load an ONNX model: get_model_path, provider detection
# --------------------------------------------------------------------------------------------

ONNX_SCRIPT = """
    import json
    import numpy as np
    import onnxruntime as ort
    from modules.scoring import get_model_path

    def init():
        global session
        path = get_model_path("digits") + "/model.onnx"
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

    def run(raw):
        x = np.asarray(json.loads(raw)["data"], dtype=np.float32)
        label, _ = session.run(None, {session.get_inputs()[0].name: x})
        return label
"""


async def test_entry_script_with_onnx_reports_its_provider(
    tmp_path: Path, digits: tuple[Path, np.ndarray]
) -> None:
    model, x = digits
    script = write_script(tmp_path / "score.py", ONNX_SCRIPT)
    async with serving(_config(tmp_path, ENTRY_SCRIPT=str(script), MODEL_DIR=str(model.parent))) as (
        client,
        _,
    ):
        response = await client.post("/score", json={"data": x.tolist()})
        expected = ort.InferenceSession(str(model)).run(None, {"X": x})[0]
        assert await response.json() == expected.tolist()
        meta = await (await client.get("/v2/models/score")).json()
        assert meta["parameters"]["execution_provider"] == "CPUExecutionProvider"
        metrics = await (await client.get("/metrics")).text()
        assert 'scoring_execution_provider_info{model="score",provider="CPUExecutionProvider"} 1' in metrics


async def test_get_model_path_with_several_models(tmp_path: Path) -> None:
    root = tmp_path / "models"
    for name, version in (("digits", "1"), ("digits", "2"), ("iris", "5")):
        (root / name / version).mkdir(parents=True)
        (root / name / version / "weights.txt").write_text(f"{name} v{version}")
    script = write_script(
        tmp_path / "score.py",
        """
        import os
        from modules.scoring import ModelPathError, get_model_path

        def init():
            global latest
            latest = open(os.path.join(get_model_path("digits"), "weights.txt")).read()

        def run(raw):
            import json
            ask = json.loads(raw)
            try:
                path = get_model_path(ask["name"], ask.get("version"))
            except ModelPathError as e:
                return {"error": str(e)}
            return {
                "path": path,
                "weights": open(os.path.join(path, "weights.txt")).read(),
                "latest": latest,
                "env": [os.environ["MODEL_DIR"], os.environ["AZUREML_MODEL_DIR"]],
            }
        """,
    )
    async with serving(_config(tmp_path, ENTRY_SCRIPT=str(script), MODEL_DIR=str(root))) as (client, _):
        latest = await (await client.post("/score", json={"name": "digits"})).json()
        assert latest == {
            "path": str(root / "digits" / "2"),
            "weights": "digits v2",
            "latest": "digits v2",
            "env": [str(root), str(root)],
        }
        first = await (await client.post("/score", json={"name": "digits", "version": 1})).json()
        assert first["weights"] == "digits v1"
        assert (await (await client.post("/score", json={"name": "iris"})).json())["weights"] == "iris v5"
        missing = await (await client.post("/score", json={"name": "wine"})).json()
        assert missing["error"] == f"model 'wine' not found in {root} (available: digits, iris)"


# --------------------------------------------------------------------------------------------
# Raw-request mode
# --------------------------------------------------------------------------------------------

RAW_SCRIPT = """
    from modules.scoring import ScoringResponse, rawhttp

    CORS = {"Access-Control-Allow-Origin": "*", "Access-Control-Allow-Methods": "POST, GET, OPTIONS",
            "Access-Control-Allow-Headers": "Content-Type, Authorization"}

    def init():
        pass

    @rawhttp
    def run(request):
        if request.method == "OPTIONS":
            return ScoringResponse(b"", 204, CORS)
        if request.method == "GET":
            return {"query": dict(request.query), "path": request.full_path}
        return ScoringResponse(request.body[::-1], 200, {**CORS, "Content-Type": "application/octet-stream",
                               "X-Length": str(len(request.get_data()))})
"""


async def test_raw_mode_binary_body_and_cors(tmp_path: Path) -> None:
    script = write_script(tmp_path / "score.py", RAW_SCRIPT)
    async with serving(_config(tmp_path, ENTRY_SCRIPT=str(script))) as (client, _):
        payload = bytes(range(256)) * 4
        response = await client.post("/score", data=payload, headers={"Content-Type": "image/png"})
        assert response.status == 200
        assert await response.read() == payload[::-1]
        assert response.headers["Content-Type"] == "application/octet-stream"
        assert response.headers["Access-Control-Allow-Origin"] == "*"
        assert response.headers["X-Length"] == "1024"
        preflight = await client.options(
            "/score", headers={"Origin": "http://example.org", "Access-Control-Request-Method": "POST"}
        )
        assert preflight.status == 204
        assert preflight.headers["Access-Control-Allow-Methods"] == "POST, GET, OPTIONS"
        get = await client.get("/score?x=1&y=two")
        assert await get.json() == {"query": {"x": "1", "y": "two"}, "path": "/score?x=1&y=two"}


async def test_raw_mode_with_key_lets_preflight_through(tmp_path: Path) -> None:
    script = write_script(tmp_path / "score.py", RAW_SCRIPT)
    async with serving(_config(tmp_path, ENTRY_SCRIPT=str(script), SCORING_KEY="k1")) as (client, _):
        assert (await client.options("/score")).status == 204
        await _error(await client.post("/score", data=b"abc"), 401)
        ok = await client.post("/score", data=b"abc", headers={"Authorization": "Bearer k1"})
        assert await ok.read() == b"cba"


async def test_unmodified_azureml_raw_script(tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "score.py",
        """
        from azureml.contrib.services.aml_request import AMLRequest, rawhttp
        from azureml.contrib.services.aml_response import AMLResponse

        def init():
            pass

        @rawhttp
        def run(request):
            if request.method == "POST":
                reqBody = request.get_data(False)
                answer = {"length": len(reqBody), "head": request.headers.get("X-Head")}
                return AMLResponse(answer, 200, json_str=True)
            return AMLResponse("bad request, use POST", 500)
        """,
    )
    async with serving(_config(tmp_path, ENTRY_SCRIPT=str(script))) as (client, _):
        response = await client.post("/score", data=b"\x00" * 10, headers={"X-Head": "h"})
        assert await response.json() == {"length": 10, "head": "h"}
        wrong = await client.get("/score")
        assert (wrong.status, await wrong.text()) == (500, "bad request, use POST")


# --------------------------------------------------------------------------------------------
# inference_schema scripts
# --------------------------------------------------------------------------------------------

SCHEMA_SCRIPT = """
    import numpy as np
    from inference_schema.schema_decorators import input_schema, output_schema
    from inference_schema.parameter_types.numpy_parameter_type import NumpyParameterType
    from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType

    def init():
        pass

    @input_schema("data", NumpyParameterType(np.array([[0.5, 1.5, 2.5]], dtype=np.float32)))
    @input_schema("scale", StandardPythonParameterType(1.0))
    @output_schema(NumpyParameterType(np.array([4.5])))
    def run(data, scale=1.0):
        assert isinstance(data, np.ndarray) and data.dtype == np.float32
        return data.sum(axis=1) * scale
"""


async def test_inference_schema_script(tmp_path: Path) -> None:
    script = write_script(tmp_path / "score.py", SCHEMA_SCRIPT)
    async with serving(_config(tmp_path, ENTRY_SCRIPT=str(script))) as (client, _):
        response = await client.post("/score", json={"data": [[1, 2, 3], [4, 5, 6]], "scale": 2})
        assert await response.json() == [12.0, 30.0]
        assert await (await client.post("/score", json={"data": [[1, 1, 1]]})).json() == [3.0]
        assert "size 2 on dimension #1" in await _error(
            await client.post("/score", json={"data": [[1, 2]]}), 400
        )
        assert "no 'data' field" in await _error(await client.post("/score", json={"scale": 2}), 400)
        assert "must be a JSON object" in await _error(await client.post("/score", json=[1, 2, 3]), 400)
        await _alive(client)
        swagger = await (await client.get("/swagger.json")).json()
        assert swagger["info"]["description"] == "Schemas from: inference_schema"
        body = swagger["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["example"] == {"data": [[0.5, 1.5, 2.5]], "scale": 1.0}
        assert body["properties"]["data"]["type"] == "array"
        result = swagger["paths"]["/score"]["post"]["responses"]["200"]["content"]["application/json"][
            "schema"
        ]
        assert result["example"] == [4.5]


# --------------------------------------------------------------------------------------------
# No-code mode
# --------------------------------------------------------------------------------------------


async def test_no_code_score_and_oip(tmp_path: Path, digits: tuple[Path, np.ndarray]) -> None:
    model, x = digits
    session = ort.InferenceSession(str(model))
    labels, probabilities = session.run(None, {"X": x})
    async with serving(_config(tmp_path, MODEL_DIR=str(model.parent))) as (client, _):
        scored = await (await client.post("/score", json={"data": x.tolist()})).json()
        assert scored["outputs"]["label"] == labels.tolist()
        assert np.allclose(scored["outputs"]["probabilities"], probabilities, atol=1e-6)
        named = await (await client.post("/score", json={"inputs": {"X": x[0].tolist()}})).json()
        assert named["outputs"]["label"] == labels[:1].tolist()

        meta = await (await client.get("/v2/models/digits")).json()
        assert meta == {
            "name": "digits",
            "versions": ["1"],
            "platform": "onnxruntime",
            "inputs": [{"name": "X", "datatype": "FP32", "shape": [-1, 64]}],
            "outputs": [
                {"name": "label", "datatype": "INT64", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]},
            ],
            "parameters": {
                "execution_provider": "CPUExecutionProvider",
                "precision": "f32",
                "batching": {"enabled": True, "max_batch_size": 32, "max_batch_delay_ms": 0.0},
            },
        }
        request = {
            "id": "r1",
            "inputs": [{"name": "X", "shape": [4, 64], "datatype": "FP32", "data": x.ravel().tolist()}],
        }
        oip = await (await client.post("/v2/models/digits/infer", json=request)).json()
        assert (oip["model_name"], oip["model_version"], oip["id"]) == ("digits", "1", "r1")
        assert {o["name"]: o["data"] for o in oip["outputs"]}["label"] == labels.tolist()

        body, header_len = encode_binary_request({"X": x})
        binary = await client.post(
            "/v2/models/digits/infer",
            data=body,
            headers={INFERENCE_HEADER: str(header_len), "Content-Type": "application/octet-stream"},
        )
        assert binary.status == 200, await binary.text()
        outputs = decode_oip_response(await binary.read(), int(binary.headers[INFERENCE_HEADER]))
        assert outputs["label"].tolist() == labels.tolist()
        assert np.allclose(outputs["probabilities"], probabilities, atol=1e-6)
        assert (await (await client.get("/v2")).json())["extensions"] == ["binary_tensor_data"]


async def test_no_code_on_openvino_reports_its_device(tmp_path: Path) -> None:
    pytest.importorskip("openvino", reason="OpenVINO is not installed: the openvino-cpu profile cannot run")
    model, x = digits_linear_model(tmp_path / "linear" / "1")
    expected = ort.InferenceSession(str(model)).run(None, {"x": x})[0]
    async with serving(_config(tmp_path, MODEL_DIR=str(model.parent), PROFILE="openvino-cpu")) as (client, _):
        scored = await (await client.post("/score", json={"data": x.tolist()})).json()
        assert np.allclose(scored["result"], expected, atol=1e-5)
        meta = await (await client.get("/v2/models/linear")).json()
        assert (meta["platform"], meta["parameters"]["execution_provider"]) == ("openvino", "openvino:CPU")
        assert meta["parameters"]["precision"] == "f32"  # even on CPUs with bf16 units
        metrics = await (await client.get("/metrics")).text()
        assert 'scoring_execution_provider_info{model="linear",provider="openvino:CPU"} 1' in metrics


async def test_no_code_bad_input_names_input_and_shape(
    tmp_path: Path, digits: tuple[Path, np.ndarray]
) -> None:
    model, x = digits
    async with serving(_config(tmp_path, MODEL_DIR=str(model.parent))) as (client, _):
        cases = [
            ({"data": [[1.0, 2.0]]}, "input 'X': expected shape [-1, 64] (FP32), got [1, 2]"),
            ({"data": [["a"] * 64]}, "input 'X'"),
            ({"inputs": {"Y": x.tolist()}}, "unknown input(s) 'Y'"),
            ({"nothing": 1}, '{"data": array}'),
        ]
        for payload, message in cases:
            assert message in await _error(await client.post("/score", json=payload), 400)
            await _alive(client)
        oip = {"inputs": [{"name": "X", "shape": [1, 64], "datatype": "INT64", "data": [0] * 64}]}
        assert "got datatype INT64" in await _error(
            await client.post("/v2/models/digits/infer", json=oip), 400
        )
        bad_header = await client.post("/v2/models/digits/infer", data=b"{}", headers={INFERENCE_HEADER: "x"})
        assert "must be a byte count" in await _error(bad_header, 400)
        assert "no model 'nope'" in await _error(await client.post("/v2/models/nope/infer", json=oip), 404)
        assert (await client.post("/score", json={"data": x.tolist()})).status == 200


async def test_no_code_several_models(tmp_path: Path, digits: tuple[Path, np.ndarray]) -> None:
    model, x = digits
    root = tmp_path / "models"
    for name in ("a", "b"):
        (root / name / "3").mkdir(parents=True)
        (root / name / "3" / "model.onnx").write_bytes(model.read_bytes())
    async with serving(_config(tmp_path, MODEL_DIR=str(root))) as (client, _):
        assert "use POST /v2/models/{name}/infer" in await _error(
            await client.post("/score", json={"data": x.tolist()}), 400
        )
        request = {"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": x[0].tolist()}]}
        for name in ("a", "b"):
            answer = await (await client.post(f"/v2/models/{name}/infer", json=request)).json()
            assert (answer["model_name"], answer["model_version"]) == (name, "3")


async def test_no_code_swagger_from_model(tmp_path: Path, digits: tuple[Path, np.ndarray]) -> None:
    model, _ = digits
    async with serving(_config(tmp_path, MODEL_DIR=str(model.parent))) as (client, _):
        swagger = await (await client.get("/swagger.json")).json()
        assert swagger["info"]["title"] == "digits"
        assert swagger["info"]["description"] == "Schemas from: model"
        body = swagger["paths"]["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body["required"] == ["data"] and len(body["example"]["data"][0]) == 64
        assert "/v2/models/digits/infer" in swagger["paths"]


async def test_swagger_from_module_json_samples(tmp_path: Path) -> None:
    script = write_script(tmp_path / "module" / "src" / "score.py", ECHO_SCRIPT)
    module_json = tmp_path / "module" / "module.json"
    sample_in, sample_out = {"data": [[1.0, 2.0]]}, {"got": {"data": [[1.0, 2.0]]}}
    module_json.write_text(
        json.dumps(
            {
                "name": "echo",
                "version": "4",
                "entry_script": "score.py",
                "input_sample": sample_in,
                "output_sample": sample_out,
            }
        )
    )
    config = load_config({"MODULE_JSON": str(module_json), "HOST": "127.0.0.1"}, [])
    assert config.entry_script == script
    async with serving(config) as (client, _):
        swagger = await (await client.get("/swagger.json")).json()
        assert (swagger["info"]["title"], swagger["info"]["version"]) == ("echo", "4")
        post = swagger["paths"]["/score"]["post"]
        assert post["requestBody"]["content"]["application/json"]["schema"]["example"] == sample_in
        assert post["responses"]["200"]["content"]["application/json"]["schema"]["example"] == sample_out


# --------------------------------------------------------------------------------------------
# Auth and metrics
# --------------------------------------------------------------------------------------------


async def test_auth(tmp_path: Path, digits: tuple[Path, np.ndarray]) -> None:
    model, x = digits
    async with serving(_config(tmp_path, MODEL_DIR=str(model.parent), SCORING_KEY="s3cret")) as (client, _):
        body = {"data": x[:1].tolist()}
        missing = await client.post("/score", json=body)
        assert "missing Authorization" in await _error(missing, 401)
        assert missing.headers["WWW-Authenticate"] == "Bearer"
        assert (await missing.json())["request_id"] == missing.headers["X-Request-Id"], "as the docs promise"
        traced = await client.post("/score", json=body, headers={"X-Request-Id": "trace-7"})
        assert (await traced.json())["request_id"] == "trace-7"
        assert "wrong key" in await _error(
            await client.post("/score", json=body, headers={"Authorization": "Bearer nope"}), 401
        )
        assert (
            await client.post("/score", json=body, headers={"Authorization": "Bearer s3cret"})
        ).status == 200
        oip = {"inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": x[0].tolist()}]}
        await _error(await client.post("/v2/models/digits/infer", json=oip), 401)
        allowed = await client.post(
            "/v2/models/digits/infer", json=oip, headers={"Authorization": "Bearer s3cret"}
        )
        assert allowed.status == 200
        for path in (
            "/",
            "/v2/health/live",
            "/v2/health/ready",
            "/v2/models/digits",
            "/metrics",
            "/swagger.json",
        ):
            assert (await client.get(path)).status == 200, path
        swagger = await (await client.get("/swagger.json")).json()
        assert swagger["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_metrics_content(tmp_path: Path, digits: tuple[Path, np.ndarray]) -> None:
    model, x = digits
    async with serving(_config(tmp_path, MODEL_DIR=str(model.parent))) as (client, _):
        for _ in range(3):
            assert (await client.post("/score", json={"data": x[:1].tolist()})).status == 200
        await client.post("/score", data=b"{", headers={"Content-Type": "application/json"})
        await client.get("/nowhere")
        response = await client.get("/metrics")
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = await response.text()
    assert 'scoring_requests_total{route="/score",code="200"} 3' in text
    assert 'scoring_requests_total{route="/score",code="400"} 1' in text
    assert 'scoring_request_errors_total{route="/score",reason="bad_request"} 1' in text
    assert 'scoring_requests_total{route="unmatched",code="404"} 1' in text
    assert 'scoring_request_duration_seconds_bucket{route="/score",le="0.00025"}' in text
    assert 'scoring_request_duration_seconds_count{route="/score"} 4' in text
    assert 'scoring_execution_provider_info{model="digits",provider="CPUExecutionProvider"} 1' in text
    assert "scoring_requests_in_flight 1" in text, "the /metrics request itself is in flight"
    assert "scoring_ready 1" in text
    init = next(line for line in text.splitlines() if line.startswith("scoring_init_duration_seconds "))
    assert float(init.split()[1]) > 0


async def test_every_answer_names_the_instance_the_agent_started(tmp_path: Path) -> None:
    script = write_script(tmp_path / "score.py", ECHO_SCRIPT)
    async with serving(_config(tmp_path, ENTRY_SCRIPT=str(script), EDGE_INSTANCE_ID="abc123")) as (client, _):
        for path in ("/", "/v2/health/ready", "/no-such-route"):
            response = await client.get(path)
            assert response.headers.get("X-Edge-Instance") == "abc123", path
    async with serving(_config(tmp_path, ENTRY_SCRIPT=str(script))) as (client, _):
        assert "X-Edge-Instance" not in (await client.get("/")).headers


# --------------------------------------------------------------------------------------------
# Adaptive batching
# --------------------------------------------------------------------------------------------


async def test_concurrent_requests_are_batched_and_answered_as_alone(
    tmp_path: Path, digits: tuple[Path, np.ndarray]
) -> None:
    model, x = digits
    session = ort.InferenceSession(str(model))
    rows = np.concatenate([x] * 16)  # 64 rows, sent as 64 concurrent requests of one row
    labels, probabilities = session.run(None, {"X": rows})
    async with serving(_config(tmp_path, MODEL_DIR=str(model.parent))) as (client, scoring):
        answers = await asyncio.gather(
            *(client.post("/score", json={"data": [row.tolist()]}) for row in rows),
            *(
                client.post(
                    "/v2/models/digits/infer",
                    json={
                        "inputs": [{"name": "X", "shape": [1, 64], "datatype": "FP32", "data": row.tolist()}]
                    },
                )
                for row in rows[:8]
            ),
        )
        docs = [await a.json() for a in answers]
        assert [a.status for a in answers] == [200] * 72, docs
        for i, doc in enumerate(docs[:64]):
            assert doc["outputs"]["label"] == [labels[i]]
            assert np.allclose(doc["outputs"]["probabilities"], probabilities[i : i + 1], atol=1e-6)
        for i, doc in enumerate(docs[64:]):
            assert {o["name"]: o["data"] for o in doc["outputs"]}["label"] == [labels[i]]
        metrics = await (await client.get("/metrics")).text()
        count = next(line for line in metrics.splitlines() if line.startswith("scoring_batch_size_count"))
        total = next(line for line in metrics.splitlines() if line.startswith("scoring_batch_size_sum"))
        assert float(total.split()[-1]) == 72, "every row went through the batcher"
        assert int(count.split()[-1]) < 72, f"some requests shared a batch ({count})"
        assert 'scoring_batch_queued{model="digits"} 0' in metrics
        assert scoring.service.batchers["digits"].split_batches == 0  # type: ignore[attr-defined]


async def test_a_bad_request_among_batched_ones_fails_alone(
    tmp_path: Path, digits: tuple[Path, np.ndarray]
) -> None:
    model, x = digits
    async with serving(_config(tmp_path, MODEL_DIR=str(model.parent))) as (client, _):
        good = [client.post("/score", json={"data": [row.tolist()]}) for row in x]
        wrong = client.post("/score", json={"data": [[1.0] * 63]})
        answers = await asyncio.gather(*good, wrong)
        assert [a.status for a in answers] == [200] * 4 + [400]
        assert "shape" in await _error(answers[-1], 400)


async def test_a_model_without_a_batch_dimension_is_served_unbatched(tmp_path: Path) -> None:
    from onnx import TensorProto, helper

    folder = tmp_path / "fixed" / "1"
    folder.mkdir(parents=True)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    async with serving(_config(tmp_path, MODEL_DIR=str(folder))) as (client, _):
        answers = await asyncio.gather(
            *(client.post("/score", json={"data": [[-1, 2, -3, 4]]}) for _ in range(8))
        )
        docs = [await a.json() for a in answers]
        assert docs == [{"result": [[0, 2, 0, 4]]}] * 8, "one output: answered as result"
        meta = await (await client.get("/v2/models/fixed")).json()
        assert meta["parameters"]["batching"] == {
            "enabled": False,
            "reason": "input 'x' has shape [1, 4], without a dynamic batch dimension",
        }
        assert "scoring_batch_size" not in await (await client.get("/metrics")).text()


async def test_batching_can_be_turned_off(tmp_path: Path, digits: tuple[Path, np.ndarray]) -> None:
    model, x = digits
    async with serving(_config(tmp_path, MODEL_DIR=str(model.parent), SCORING_MAX_BATCH_SIZE="1")) as (
        client,
        _,
    ):
        answer = await client.post("/score", json={"data": x.tolist()})
        assert answer.status == 200
        meta = await (await client.get("/v2/models/digits")).json()
        assert meta["parameters"]["batching"] == {
            "enabled": False,
            "reason": "batching is off (SCORING_MAX_BATCH_SIZE=1)",
        }


BATCH_SCRIPT = """
    import json, threading
    calls = []
    started, release = threading.Event(), threading.Event()
    def init():
        pass
    def run(data):
        return {"alone": json.loads(data)["x"] * 2}
    def run_batch(data_list):
        calls.append(len(data_list))
        if len(calls) == 1:
            started.set()
            release.wait(10)
        out = []
        for d in data_list:
            x = json.loads(d)["x"]
            if x < 0:
                raise ValueError("negative input")
            out.append({"batch": x * 2})
        return out
"""


async def test_an_entry_script_with_run_batch_gets_the_requests_that_wait_together(tmp_path: Path) -> None:
    script = write_script(tmp_path / "score.py", BATCH_SCRIPT)
    async with serving(_config(tmp_path, ENTRY_SCRIPT=str(script))) as (client, scoring):
        module = scoring.service.script.module  # type: ignore[attr-defined]
        first = asyncio.ensure_future(client.post("/score", json={"x": 0}))
        await asyncio.to_thread(module.started.wait, 10)
        others = [asyncio.ensure_future(client.post("/score", json={"x": x})) for x in (1, 2, -3, 4)]
        await asyncio.sleep(0.2)
        module.release.set()
        assert await (await first).json() == {"batch": 0}
        answers = await asyncio.gather(*others)
        assert [a.status for a in answers] == [200, 200, 500, 200]
        assert [await answers[i].json() for i in (0, 1, 3)] == [{"batch": 2}, {"batch": 4}, {"batch": 8}]
        assert "negative input" in await _error(answers[2], 500)
        assert module.calls == [1, 4, 1, 1, 1, 1], "the 4 waiting ran as one batch, then one by one"
        metrics = await (await client.get("/metrics")).text()
        assert 'scoring_batch_splits_total{model="score"} 1' in metrics


async def test_run_batch_needs_a_plain_run(tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "score.py",
        """
        from modules.scoring import rawhttp
        def init():
            pass
        @rawhttp
        def run(request):
            return {}
        def run_batch(data_list):
            return data_list
        """,
    )
    async with serving(_config(tmp_path, ENTRY_SCRIPT=str(script)), load=False) as (_, scoring):
        assert not await scoring.load()
        assert (
            "run_batch() in" in scoring.readiness.reason()
            and "needs a plain run(data)" in scoring.readiness.reason()
        )


async def test_inference_threads_never_add_up_to_more_than_the_cpus(
    tmp_path: Path, digits: tuple[Path, np.ndarray]
) -> None:
    """SCORING_THREADS stands for the CPUs (affinity and cgroup quota otherwise, see test_cpus)."""
    model, _ = digits
    async with serving(_config(tmp_path, MODEL_DIR=str(model.parent), SCORING_THREADS="3")) as (_, scoring):
        batched = scoring.service.backends["digits"]  # type: ignore[attr-defined]
        assert (batched.threads, batched.concurrent, scoring.pool.threads) == (3, 1, 3), (
            "one batch on 3 threads"
        )
    unbatched_env = {"MODEL_DIR": str(model.parent), "SCORING_THREADS": "3", "SCORING_MAX_BATCH_SIZE": "1"}
    async with serving(_config(tmp_path, **unbatched_env)) as (_, scoring):
        alone = scoring.service.backends["digits"]  # type: ignore[attr-defined]
        assert (alone.threads, alone.concurrent, scoring.pool.threads) == (1, 3, 3), "3 runs of 1 thread"


# --------------------------------------------------------------------------------------------
# Open Inference Protocol on entry scripts that declare their inputs
# --------------------------------------------------------------------------------------------


async def test_an_entry_script_with_declared_inputs_speaks_oip(tmp_path: Path) -> None:
    script = write_script(tmp_path / "score.py", SCHEMA_SCRIPT)
    async with serving(_config(tmp_path, ENTRY_SCRIPT=str(script))) as (client, _):
        meta = await (await client.get("/v2/models/score")).json()
        assert meta["inputs"] == [{"name": "data", "datatype": "FP32", "shape": [-1, 3]}]
        request = {
            "id": "r9",
            "inputs": [{"name": "data", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}],
        }
        answer = await (await client.post("/v2/models/score/infer", json=request)).json()
        assert answer["id"] == "r9" and answer["model_name"] == "score"
        [output] = answer["outputs"]
        assert (output["name"], output["shape"], output["data"]) == ("output", [2], [6.0, 15.0])
        wrong = {"inputs": [{"name": "data", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
        assert "data" in await _error(await client.post("/v2/models/score/infer", json=wrong), 400)
        unknown = {"inputs": [{"name": "pixels", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}
        assert "pixels" in await _error(await client.post("/v2/models/score/infer", json=unknown), 400)

        import tritonclient.http as triton

        url = f"127.0.0.1:{client.port}"

        def with_tritonclient() -> np.ndarray:
            triton_client = triton.InferenceServerClient(url=url)
            try:
                assert triton_client.is_model_ready("score")
                tensor = triton.InferInput("data", [2, 3], "FP32")
                tensor.set_data_from_numpy(
                    np.array([[1, 1, 1], [2, 2, 2]], dtype=np.float32), binary_data=True
                )
                result = triton_client.infer(
                    "score", [tensor], outputs=[triton.InferRequestedOutput("output")]
                )
                return result.as_numpy("output")
            finally:
                triton_client.close()

        assert (await asyncio.to_thread(with_tritonclient)).tolist() == [3.0, 6.0]


async def test_a_plain_script_with_an_object_sample_speaks_oip(tmp_path: Path) -> None:
    root = tmp_path / "module"
    write_script(
        root / "src" / "score.py",
        """
        import json
        def init():
            pass
        def run(data):
            rows = json.loads(data)["pixels"]
            return {"label": [int(sum(r) > 1) for r in rows], "total": [sum(r) for r in rows]}
        """,
    )
    info = {
        "name": "pix",
        "entry_script": "score.py",
        "input_sample": {"pixels": [[0.5, 0.25]]},
        "output_sample": {"label": [0], "total": [0.75]},
    }
    (root / "module.json").write_text(json.dumps(info))
    config = load_config({"MODULE_JSON": str(root / "module.json"), "HOST": "127.0.0.1"}, [])
    async with serving(config) as (client, _):
        meta = await (await client.get("/v2/models/pix")).json()
        assert meta["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 2]}]
        assert [o["name"] for o in meta["outputs"]] == ["label", "total"]
        request = {
            "inputs": [{"name": "pixels", "shape": [2, 2], "datatype": "FP32", "data": [1, 1, 0, 0.5]}],
            "outputs": [{"name": "label"}],
        }
        answer = await (await client.post("/v2/models/pix/infer", json=request)).json()
        assert [(o["name"], o["data"]) for o in answer["outputs"]] == [("label", [1, 0])], (
            "only what was asked"
        )
