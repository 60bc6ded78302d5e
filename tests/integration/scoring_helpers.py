"""Helpers for scoring server tests: a digits ONNX model, entry scripts, real server processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from tests.services import free_port

REPO = Path(__file__).resolve().parents[2]
START_LIMIT_S = 120.0
"""How long a server may take to answer ``GET /`` before the test fails (a bound, not an assertion)."""


def digits_model(folder: Path, name: str = "model.onnx") -> tuple[Path, np.ndarray]:
    """A logistic regression on scikit-learn's digits as ONNX (input float_input [-1, 64]) and 4 samples."""
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    clf = LogisticRegression(max_iter=300).fit(x, y)
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset=17)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(onx.SerializeToString())
    return path, x[:4]


def digits_linear_model(folder: Path) -> tuple[Path, np.ndarray]:
    """The digits logistic regression as plain ONNX ops (MatMul, Add, Softmax), which OpenVINO reads too.

    Input ``x`` [-1, 64] FP32, output ``probabilities`` [-1, 10]; returns the path and 4 samples.
    """
    from onnx import TensorProto, helper, numpy_helper
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    clf = LogisticRegression(max_iter=300).fit(x, y)
    weights = numpy_helper.from_array(clf.coef_.T.astype(np.float32), "weights")
    bias = numpy_helper.from_array(clf.intercept_.astype(np.float32), "bias")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "weights"], ["logits"]),
            helper.make_node("Add", ["logits", "bias"], ["scores"]),
            helper.make_node("Softmax", ["scores"], ["probabilities"], axis=1),
        ],
        "digits_linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 64])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 10])],
        initializer=[weights, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path, x[:4]


def write_script(path: Path, source: str) -> Path:
    """Write a dedented entry script."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    return path


class ServerProcess:
    """``python -m modules.scoring`` on a free loopback port; stderr goes to a file."""

    def __init__(
        self, tmp: Path, env: dict[str, str], args: list[str] | None = None, prefix: list[str] | None = None
    ) -> None:
        """``prefix``: a command that runs the server (``unshare ...``)."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / f"server-{self.port}.log"
        full_env = {
            k: v for k, v in os.environ.items() if k not in ("MODEL_DIR", "AZUREML_MODEL_DIR", "ENTRY_SCRIPT")
        }
        full_env.update(
            {
                "HOST": "127.0.0.1",
                "PORT": str(self.port),
                "MODULE_JSON": str(tmp / "no-module.json"),
                "PYTHONPATH": str(REPO),
                **env,
            }
        )
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*(prefix or []), sys.executable, "-m", "modules.scoring", *(args or [])],
            cwd=REPO,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def log(self) -> str:
        """Everything the server wrote so far."""
        return self.log_path.read_text(errors="replace")

    def wait_live(self) -> None:
        """Wait until ``GET /`` answers; fail with the log when the process exits or never answers."""
        deadline = time.monotonic() + START_LIMIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log}")
            try:
                with urllib.request.urlopen(self.base + "/", timeout=5):
                    return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.1)
        raise AssertionError(f"server did not answer within {START_LIMIT_S} s:\n{self.log}")

    def wait_ready(self) -> None:
        """Wait until ``/v2/health/ready`` says 200."""
        self.wait_live()
        deadline = time.monotonic() + START_LIMIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log}")
            try:
                with urllib.request.urlopen(self.base + "/v2/health/ready", timeout=5):
                    return
            except urllib.error.HTTPError:
                time.sleep(0.1)
        raise AssertionError(f"server not ready within {START_LIMIT_S} s:\n{self.log}")

    def wait_log(self, text: str) -> None:
        """Wait until the server's log contains ``text``; fail if it exits first or never writes it."""
        deadline = time.monotonic() + START_LIMIT_S
        while text not in self.log:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"server never logged {text!r}:\n{self.log}")
            time.sleep(0.05)

    def wait_metric(self, line: str) -> None:
        """Wait until ``GET /metrics`` has ``line``; fail if the server exits first or never shows it."""
        deadline = time.monotonic() + START_LIMIT_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            with urllib.request.urlopen(self.base + "/metrics", timeout=5) as response:
                if line in response.read().decode().splitlines():
                    return
            time.sleep(0.05)
        raise AssertionError(f"/metrics never showed {line!r}:\n{self.log}")

    def wait_exit(self) -> int:
        """The exit status, once the process ends by itself."""
        try:
            return self.proc.wait(timeout=START_LIMIT_S)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"server did not exit:\n{self.log}") from None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not go."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
