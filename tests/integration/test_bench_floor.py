"""The scoring benchmark's floor server and port choice (``bench/_servers.py``), as real processes."""

from __future__ import annotations

import json
import socket
import urllib.request
from pathlib import Path

import psutil
import pytest

from bench._servers import floor, free_port, http_post, running
from bench.scoring import evaluate_targets
from tests.services import ephemeral_low


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from modules.examples.digits import build_digits_onnx

    folder = tmp_path_factory.mktemp("models") / "digits"
    build_digits_onnx(folder, image_size=8, name="digits")
    return folder


def test_the_floor_answers_the_sample_from_every_process(digits: Path, tmp_path: Path) -> None:
    """Two processes share the port; requests on new connections all get the sample's label."""
    sample = json.loads((digits / "sample.json").read_text())
    expected = json.loads((digits / "expected.json").read_text())["label"]
    body = json.dumps(sample).encode()
    with running(floor("floor", "floor", digits, processes=2), tmp_path) as server:
        for _ in range(20):
            status, reply = http_post(server.url("/score"), body, timeout_s=30)
            assert status == 200
            assert json.loads(reply)["label"] == [expected]
        with urllib.request.urlopen(server.url("/"), timeout=30) as live:
            assert live.read() == b"Healthy"
        pids = {p.pid for p in psutil.Process(server.proc.pid).children()}
        assert len(pids) == 1, "one forked process beside the first"


def test_free_port_is_bindable_and_outside_the_ephemeral_range() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
    assert 10_000 <= port < ephemeral_low()


def test_convnet_targets_say_whether_the_floor_reaches_60_percent() -> None:
    limit = {"best": {"rows_per_s": 10000.0}, "batch1": {"p50_ms": 0.1}}

    def server(rps16: float) -> dict[str, object]:
        point = {"rps": rps16, "p50_ms": 0.3}
        return {"error": None, "points": {"1": point, "16": point}}

    targets = evaluate_targets("convnet", limit, {"ours-nocode": server(5000.0), "floor": server(6100.0)})
    by_name = {t["target"]: t for t in targets}
    reference = by_name["(ref) c16 floor req/s >= 60% of (a) rows/s"]
    assert (reference["measured"], reference["required"], reference["met"]) == (6100.0, 6000.0, True)
    assert by_name["c16 ours req/s >= 60% of (a) rows/s"]["met"] is False
