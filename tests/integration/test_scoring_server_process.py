"""The scoring server as a real process (``python -m modules.scoring``): start-up, readiness, exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import numpy as np
import onnxruntime as ort
import pytest

from modules.scoring.config import VARIABLES
from tests.integration.scoring_helpers import REPO, ServerProcess, digits_model, write_script


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method="POST", headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """``<tmp>/digits/1/model.onnx`` and four sample rows."""
    return digits_model(tmp_path_factory.mktemp("models") / "digits" / "1")


SLOW_INIT = """
    import os, time
    from pathlib import Path

    def init():
        gate = Path(os.environ["INIT_GATE"])
        while not gate.exists():
            time.sleep(0.05)
        if gate.read_text() == "fail":
            raise RuntimeError("init failed on purpose")

    def run(data):
        return {"echo": data}
"""


def test_entry_script_end_to_end(tmp_path: Path, digits: tuple[Path, np.ndarray]) -> None:
    model, x = digits
    script = write_script(
        tmp_path / "score.py",
        """
        import json, os
        import numpy as np
        import onnxruntime as ort

        def init():
            global session
            path = os.path.join(os.environ["AZUREML_MODEL_DIR"], "model.onnx")
            session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])

        def run(raw_data):
            data = np.array(json.loads(raw_data)["data"], dtype=np.float32)
            return session.run(None, {"X": data})[0].tolist()
        """,
    )
    with ServerProcess(tmp_path, {"ENTRY_SCRIPT": str(script), "MODEL_DIR": str(model.parent)}) as server:
        server.wait_ready()
        status, result = _post(server.base + "/score", {"data": x.tolist()})
        assert status == 200
        assert result == ort.InferenceSession(str(model)).run(None, {"X": x})[0].tolist()
        assert _get(server.base + "/") == (200, b"Healthy")
        status, body = _post(server.base + "/score", b"{not json")
        assert status == 400 and "not valid JSON" in body["error"]
        assert _get(server.base + "/")[0] == 200
        server.stop()
        assert server.proc.returncode == 0
    start_line = next(line for line in server.log.splitlines() if "scoring ready" in line)
    for field in ("mode=entry-script", "module=score", "provider=CPUExecutionProvider", "threads=", "port="):
        assert field in start_line


def test_no_code_end_to_end(tmp_path: Path, digits: tuple[Path, np.ndarray]) -> None:
    model, x = digits
    env = {
        "MODEL_DIR": str(model.parent),
        "PROFILE": "cpu",
        "EDGE_PROFILES_DIR": str(REPO / "device-profiles"),
    }
    with ServerProcess(tmp_path, env) as server:
        server.wait_ready()
        status, result = _post(server.base + "/score", {"data": x.tolist()})
        assert status == 200
        assert result["outputs"]["label"] == ort.InferenceSession(str(model)).run(None, {"X": x})[0].tolist()
        status, meta = _get(server.base + "/v2/models/digits")
        assert json.loads(meta)["parameters"]["execution_provider"] == "CPUExecutionProvider"
        status, body = _post(server.base + "/score", {"data": [[1, 2, 3]]})
        assert status == 400 and "expected shape [-1, 64]" in body["error"]
        assert _get(server.base + "/")[0] == 200
    assert "mode=no-code" in server.log and "provider=CPUExecutionProvider" in server.log


def test_slow_init_live_but_not_ready(tmp_path: Path) -> None:
    script = write_script(tmp_path / "score.py", SLOW_INIT)
    gate = tmp_path / "gate"
    with ServerProcess(tmp_path, {"ENTRY_SCRIPT": str(script), "INIT_GATE": str(gate)}) as server:
        server.wait_live()
        assert _get(server.base + "/") == (200, b"Healthy")
        status, body = _get(server.base + "/v2/health/ready")
        assert status == 503 and "still initialising" in json.loads(body)["reason"]
        status, error = _post(server.base + "/score", {"x": 1})
        assert status == 503 and "not ready" in error["error"]
        assert b"scoring_ready 0" in _get(server.base + "/metrics")[1]
        gate.write_text("go")
        server.wait_ready()
        assert _post(server.base + "/score", {"x": 1}) == (200, {"echo": '{"x": 1}'})


def test_init_failure_exits_3_with_the_traceback(tmp_path: Path) -> None:
    script = write_script(tmp_path / "score.py", SLOW_INIT)
    gate = tmp_path / "gate"
    gate.write_text("fail")
    with ServerProcess(tmp_path, {"ENTRY_SCRIPT": str(script), "INIT_GATE": str(gate)}) as server:
        assert server.wait_exit() == 3
    assert "Traceback" in server.log
    assert "RuntimeError: init failed on purpose" in server.log
    assert "edge-score: error: initialisation failed" in server.log


def test_init_failure_can_stay_up_not_ready(tmp_path: Path) -> None:
    script = write_script(tmp_path / "score.py", SLOW_INIT)
    gate = tmp_path / "gate"
    gate.write_text("fail")
    env = {"ENTRY_SCRIPT": str(script), "INIT_GATE": str(gate), "EXIT_ON_INIT_FAILURE": "0"}
    with ServerProcess(tmp_path, env) as server:
        server.wait_live()
        server.wait_log("staying up, not ready")
        status, body = _get(server.base + "/v2/health/ready")
        assert status == 503
        assert "init failed on purpose" in json.loads(body)["reason"]
        status, error = _post(server.base + "/score", {"x": 1})
        assert status == 503 and "init failed on purpose" in error["error"]
        assert _get(server.base + "/") == (200, b"Healthy")


def test_strict_profile_without_its_provider_fails_start_up(
    tmp_path: Path, digits: tuple[Path, np.ndarray]
) -> None:
    model, _ = digits
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA: the strict cuda profile would start")
    profiles = tmp_path / "profiles"
    shutil.copytree(REPO / "device-profiles", profiles)
    cuda = profiles / "cuda.yaml"
    assert "strict: false" in cuda.read_text()
    cuda.write_text(cuda.read_text().replace("strict: false", "strict: true"))
    env = {"MODEL_DIR": str(model.parent), "PROFILE": "cuda", "EDGE_PROFILES_DIR": str(profiles)}
    with ServerProcess(tmp_path, env) as server:
        assert server.wait_exit() == 3
    assert "profile cuda is strict: CUDAExecutionProvider is not available" in server.log
    assert "edge-score: error:" in server.log


def test_sigterm_answers_requests_still_running_and_exits_0(tmp_path: Path) -> None:
    script = write_script(
        tmp_path / "score.py",
        """
        import threading
        def init():
            pass
        def run(data):
            threading.Event().wait()
        """,
    )
    with ServerProcess(tmp_path, {"ENTRY_SCRIPT": str(script)}) as server, ThreadPoolExecutor(1) as pool:
        server.wait_ready()
        stuck = pool.submit(_post, server.base + "/score", {"x": 1})
        server.wait_metric("scoring_inference_running 1")
        server.proc.terminate()
        assert stuck.result(timeout=60) == (503, {"error": "the server is shutting down", "request_id": ANY})
        assert server.wait_exit() == 0


def test_configuration_error_exits_2() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "modules.scoring", "--module-json", "/nonexistent/module.json"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "configuration error: nothing to serve" in result.stderr


def test_help_documents_every_variable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "modules.scoring", "--help"],
        cwd=REPO,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0
    for name in VARIABLES:
        assert name in result.stdout
