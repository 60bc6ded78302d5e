"""Several scoring worker processes on one port (``SCORING_WORKERS``), as real processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.integration.scoring_helpers import START_LIMIT_S, ServerProcess, digits_model


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """``<tmp>/digits/1/model.onnx`` and four sample rows."""
    return digits_model(tmp_path_factory.mktemp("models") / "digits" / "1")


def _workers(server: ServerProcess) -> list[psutil.Process]:
    return psutil.Process(server.proc.pid).children()


def _score(server: ServerProcess, rows: np.ndarray) -> tuple[int, dict[str, object]]:
    """One POST /score on a new connection (urllib never reuses one), so the workers share them."""
    request = urllib.request.Request(
        server.base + "/score",
        data=json.dumps({"data": rows.tolist()}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.status, json.loads(response.read())


def _metrics(server: ServerProcess) -> dict[str, str]:
    with urllib.request.urlopen(server.base + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1]
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def _own_count(socket_path: Path) -> int:
    """/score answers counted by one worker alone (its sibling socket, HTTP/1.0 by hand)."""
    with socket.socket(socket.AF_UNIX) as unix:
        unix.settimeout(30)
        unix.connect(str(socket_path))
        unix.sendall(b"GET /metrics HTTP/1.0\r\nHost: worker\r\n\r\n")
        chunks = []
        while chunk := unix.recv(65536):
            chunks.append(chunk)
    text = b"".join(chunks).decode()
    prefix = 'scoring_requests_total{route="/score",code="200"} '
    return sum(int(line[len(prefix) :]) for line in text.splitlines() if line.startswith(prefix))


def test_workers_share_the_port_report_together_and_stop_cleanly(
    tmp_path: Path, digits: tuple[Path, np.ndarray]
) -> None:
    model, x = digits
    run_root = tmp_path / "run"
    run_root.mkdir()
    env = {
        "MODEL_DIR": str(model.parent),
        "SCORING_WORKERS": "2",
        "SCORING_THREADS": "2",
        "TMPDIR": str(run_root),
    }
    with ServerProcess(tmp_path, env) as server:
        server.wait_ready()
        workers = _workers(server)
        assert len(workers) == 2, server.log
        for i in range(30):
            status, answer = _score(server, x[i % 4 : i % 4 + 1])
            assert status == 200
            assert answer["outputs"]["label"] == [int(i % 4)], answer  # type: ignore[index]
        values = _metrics(server)
        assert values['scoring_requests_total{route="/score",code="200"}'] == "30"
        assert values["scoring_workers"] == "2"
        assert values["scoring_workers_reporting"] == "2"
        assert values["scoring_ready"] == "1"
        assert values["scoring_inference_threads"] == "2", "one inference thread per worker"
        [run_dir] = run_root.glob("edge-score-*")
        own = [_own_count(run_dir / f"worker-{i}.sock") for i in (1, 2)]
        assert sum(own) == 30
        assert min(own) > 0, f"SO_REUSEPORT spreads 30 new connections over both workers: {own}"
        log = server.log
        assert "2 worker processes" in log and "1 inference thread(s) each" in log
        for slot in ("1/2", "2/2"):
            assert f"scoring ready worker={slot} " in log
        assert log.count("1 intra-op thread(s) per run") == 2
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
        assert list(run_root.glob("edge-score-*")) == [], "the supervisor removes its folder"


def test_a_worker_that_cannot_load_stops_the_server_with_status_3(tmp_path: Path) -> None:
    folder = tmp_path / "broken" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"not an onnx model")
    with ServerProcess(tmp_path, {"MODEL_DIR": str(folder), "SCORING_WORKERS": "2"}) as server:
        assert server.wait_exit() == 3
        assert "cannot load model" in server.log
        assert "exited with 3; stopping" in server.log


def test_readiness_reports_a_worker_that_failed_when_the_server_stays_up(tmp_path: Path) -> None:
    folder = tmp_path / "broken" / "1"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"not an onnx model")
    env = {"MODEL_DIR": str(folder), "SCORING_WORKERS": "2", "EXIT_ON_INIT_FAILURE": "0"}
    with ServerProcess(tmp_path, env) as server:
        deadline = time.monotonic() + START_LIMIT_S
        while server.log.count("staying up, not ready") < 2:  # both workers tried and failed
            assert time.monotonic() < deadline and server.proc.poll() is None, server.log
            time.sleep(0.05)
        server.wait_live()
        try:
            urllib.request.urlopen(server.base + "/v2/health/ready", timeout=30)
        except urllib.error.HTTPError as exc:
            assert exc.code == 503
            assert "initialisation failed" in json.loads(exc.read())["reason"]
        else:
            raise AssertionError("ready although no worker loaded the model")


def test_a_worker_killed_stops_the_others(tmp_path: Path, digits: tuple[Path, np.ndarray]) -> None:
    model, _ = digits
    with ServerProcess(tmp_path, {"MODEL_DIR": str(model.parent), "SCORING_WORKERS": "2"}) as server:
        server.wait_ready()
        first, second = _workers(server)
        first.kill()
        assert server.wait_exit() == 128 + signal.SIGKILL
        second.wait(timeout=30)
        assert f"(pid {first.pid}) exited with 137" in server.log


@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "so_reuseport"])
def test_a_port_in_use_is_status_2_before_any_worker_starts(
    tmp_path: Path, digits: tuple[Path, np.ndarray], reuse_port: bool
) -> None:
    """Also when the port's holder uses SO_REUSEPORT itself: the workers never join it."""
    model, _ = digits
    with socket.socket() as taken:
        if reuse_port:
            taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = {"MODEL_DIR": str(model.parent), "SCORING_WORKERS": "2", "PORT": str(port)}
        with ServerProcess(tmp_path, env) as server:
            assert server.wait_exit() == 2
            assert "cannot listen on" in server.log
            assert "worker" not in server.log


def test_a_stuck_worker_is_killed_and_the_server_exits(
    tmp_path: Path, digits: tuple[Path, np.ndarray]
) -> None:
    """A worker whose event loop stops (SIGSTOP here) would silently keep its connections while
    the other takes new ones: the supervisor sees its heartbeat go stale and stops the server."""
    model, _ = digits
    with ServerProcess(tmp_path, {"MODEL_DIR": str(model.parent), "SCORING_WORKERS": "2"}) as server:
        server.wait_ready()
        first, second = _workers(server)
        first.suspend()
        assert server.wait_exit() == 1
        second.wait(timeout=30)
        assert f"(pid {first.pid}): its event loop has not run for" in server.log
        assert not first.is_running() or first.status() == psutil.STATUS_ZOMBIE


def test_workers_die_with_a_killed_supervisor(tmp_path: Path, digits: tuple[Path, np.ndarray]) -> None:
    model, _ = digits
    with ServerProcess(tmp_path, {"MODEL_DIR": str(model.parent), "SCORING_WORKERS": "2"}) as server:
        server.wait_ready()
        workers = _workers(server)
        server.proc.kill()
        assert server.wait_exit() == -signal.SIGKILL
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive and len(gone) == 2


def test_the_supervisor_holds_no_listening_socket_once_the_workers_run(
    tmp_path: Path, digits: tuple[Path, np.ndarray]
) -> None:
    """Its copy would stay in the SO_REUSEPORT group after its worker exits, and the connections
    the kernel hands to that copy would wait unanswered."""
    model, _ = digits
    with ServerProcess(tmp_path, {"MODEL_DIR": str(model.parent), "SCORING_WORKERS": "2"}) as server:
        server.wait_ready()
        listening = [
            c
            for c in psutil.Process(server.proc.pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN
        ]
        assert listening == [], listening
        workers = _workers(server)
        for worker in workers:
            ports = [c.laddr.port for c in worker.net_connections("tcp") if c.status == psutil.CONN_LISTEN]
            assert ports == [server.port], "each worker listens on the port"


_PID_NAMESPACE = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]


def test_workers_run_when_the_supervisor_is_pid_1(tmp_path: Path, digits: tuple[Path, np.ndarray]) -> None:
    """In a container without an init the supervisor is pid 1: the workers must not take that
    for their supervisor having died (they once killed themselves at start, status 137)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("SKIPPED LOUDLY: running the supervisor as pid 1 needs root and unshare (util-linux)")
    probe = subprocess.run([*_PID_NAMESPACE, "true"], capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"SKIPPED LOUDLY: cannot make a pid namespace here: {probe.stderr.decode().strip()}")
    model, x = digits
    env = {"MODEL_DIR": str(model.parent), "SCORING_WORKERS": "2", "SCORING_THREADS": "2"}
    with ServerProcess(tmp_path, env, prefix=_PID_NAMESPACE) as server:
        server.wait_ready()
        [supervisor] = psutil.Process(server.proc.pid).children()
        nspid = next(
            line
            for line in Path(f"/proc/{supervisor.pid}/status").read_text().splitlines()
            if line.startswith("NSpid:")
        )
        assert nspid.split()[-1] == "1", f"the supervisor is pid 1 in its namespace: {nspid}"
        workers = supervisor.children()
        assert len(workers) == 2, server.log
        for i in range(20):
            status, answer = _score(server, x[i % 4 : i % 4 + 1])
            assert status == 200
            assert answer["outputs"]["label"] == [int(i % 4)], answer  # type: ignore[index]
        assert _metrics(server)["scoring_workers_reporting"] == "2", "both workers answer"
        assert "exited with" not in server.log
        supervisor.send_signal(signal.SIGTERM)
        assert server.wait_exit() == 0, server.log
