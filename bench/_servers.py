"""Start, probe, measure and stop the servers under test, each in its own process group.

Every server binds to 127.0.0.1. azureml-inference-server-http and MLServer live in virtualenvs
of their own (``.work/bench-venv-azureml``, ``.work/bench-venv-mlserver``, created on first use)
because they pin dependencies of their own. azureml's ``azmlinfsrv`` command always binds
0.0.0.0, so we start its own ``amlserver.run()`` with only the bind address changed to loopback
(every other setting stays its default). MLServer runs ``bench/mlserver_runtime/onnx_runtime.py``,
a minimal onnxruntime runtime, with its default settings (one parallel worker process).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

# Ports for the servers under test come from below the kernel's ephemeral range, so a busy
# machine's outgoing connections (thousands of simulated devices) cannot take one between the
# pick and the server's bind.
from tests.services import fixed_port as free_port

ROOT = Path(__file__).resolve().parent.parent
AZUREML_VENV = ROOT / ".work" / "bench-venv-azureml"
AZUREML_PACKAGES = ("azureml-inference-server-http", "onnxruntime", "numpy")
MLSERVER_VENV = ROOT / ".work" / "bench-venv-mlserver"
MLSERVER_PACKAGES = ("mlserver", "onnxruntime", "numpy", "uvloop<0.22")
"""uvloop 0.22 refuses the ``asyncio.get_event_loop()`` that MLServer 1.7's worker processes call."""
MLSERVER_RUNTIME = Path(__file__).resolve().parent / "mlserver_runtime" / "onnx_runtime.py"

_AZUREML_LOOPBACK = (
    "import sys\n"
    "from azureml_inference_server_http import amlserver\n"
    "amlserver.DEFAULT_HOST = '127.0.0.1'\n"
    "sys.argv = ['azmlinfsrv', *sys.argv[1:]]\n"
    "sys.exit(amlserver.run())\n"
)


class ServerError(RuntimeError):
    """A server could not be started or did not become ready."""


@dataclass(frozen=True)
class ServerSpec:
    """How to start one server configuration; ``{port}`` is filled in at start."""

    key: str
    label: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)
    ready_path: str = "/"
    health_path: str = "/"
    score_path: str = "/score"
    oip_model: str | None = None
    """When set, requests are Open Inference Protocol JSON for this model instead of ``{"data"}``."""


@dataclass(frozen=True)
class Broker:
    """A running Mosquitto: its loopback port and process id (for CPU accounting)."""

    port: int
    pid: int


@contextlib.contextmanager
def mosquitto(work: Path, *settings: str) -> Iterator[Broker]:
    """Mosquitto on a free 127.0.0.1 port (anonymous, no persistence, plus ``settings`` lines)."""
    binary = shutil.which("mosquitto", path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin")
    if binary is None:
        raise SystemExit("mosquitto is not installed: apt-get install mosquitto")
    port = free_port()
    lines = [f"listener {port} 127.0.0.1", "allow_anonymous true", "persistence false", *settings]
    if os.geteuid() == 0:
        lines.append("user root")
    conf = work / "mosquitto.conf"
    conf.write_text("\n".join(lines) + "\n")
    log_path = work / "mosquitto.log"
    with log_path.open("wb") as out:
        proc = subprocess.Popen([binary, "-c", str(conf)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as probe:
                probe.settimeout(0.2)
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"mosquitto did not start; see {log_path}")
            time.sleep(0.05)
        yield Broker(port, proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)


def ours(
    key: str, label: str, model_dir: Path, entry_script: Path | None = None, workers: int | None = None
) -> ServerSpec:
    """``python -m modules.scoring`` (this interpreter), no-code or entry-script mode, defaults
    otherwise; ``workers`` sets ``SCORING_WORKERS``."""
    env = {"HOST": "127.0.0.1", "MODEL_DIR": str(model_dir), "MODEL_NAME": model_dir.name}
    if entry_script is not None:
        env["ENTRY_SCRIPT"] = str(entry_script)
    if workers is not None:
        env["SCORING_WORKERS"] = str(workers)
    return ServerSpec(
        key=key,
        label=label,
        argv=(sys.executable, "-m", "modules.scoring", "--port", "{port}"),
        env=env,
        ready_path="/v2/health/ready",
        health_path="/",
    )


def floor(key: str, label: str, model_dir: Path, processes: int) -> ServerSpec:
    """The floor: ``floor_main``, the least a Python HTTP server must do per request, in
    ``processes`` processes sharing the port."""
    code = "import sys; from bench._servers import floor_main; floor_main(sys.argv[1:])"
    argv = (sys.executable, "-c", code, str(model_dir / "model.onnx"), "{port}", str(processes))
    return ServerSpec(key=key, label=label, argv=argv)


def floor_main(argv: Sequence[str]) -> None:
    """``MODEL PORT PROCESSES``: a bare aiohttp server on 127.0.0.1 with no checks, metrics, batching
    or error handling. ``POST /score`` reads ``{"data": ...}`` (orjson, numpy float32), runs the
    model's single input through ``session.run`` (one intra-op thread, no spinning) and answers
    the outputs as JSON lists; ``GET /`` answers ``Healthy``. ``PROCESSES`` processes share the
    port with ``SO_REUSEPORT``, each with its own session. Not a server to deploy: it measures what
    HTTP, JSON and inference cost in Python on these CPUs, with nothing of ours on top."""
    model, port, processes = argv[0], int(argv[1]), int(argv[2])
    sockets = []
    for _ in range(processes):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(1024)
        sockets.append(sock)
    mine = sockets[0]
    for sock in sockets[1:]:
        if os.fork() == 0:
            mine = sock
            break
    import numpy as np
    import onnxruntime as ort
    import orjson
    import uvloop
    from aiohttp import web

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]

    async def score(request: web.Request) -> web.Response:
        data = np.asarray(orjson.loads(await request.read())["data"], dtype=np.float32)
        results = session.run(outputs, {name: data})
        body = orjson.dumps({n: r.tolist() for n, r in zip(outputs, results, strict=True)})
        return web.Response(body=body, content_type="application/json")

    async def live(_request: web.Request) -> web.Response:
        return web.Response(text="Healthy")

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/score", score)
        app.router.add_get("/", live)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.SockSite(runner, mine).start()
        await asyncio.Event().wait()

    uvloop.run(serve())


def azureml(
    key: str, label: str, model_dir: Path, entry_script: Path, workers: int | None = None
) -> ServerSpec:
    """azureml-inference-server-http on loopback; ``workers`` sets ``--worker_count`` (default 1)."""
    argv = [
        str(AZUREML_VENV / "bin" / "python"),
        "-c",
        _AZUREML_LOOPBACK,
        "--entry_script",
        str(entry_script),
        "--model_dir",
        str(model_dir),
        "--port",
        "{port}",
    ]
    if workers is not None:
        argv += ["--worker_count", str(workers)]
    return ServerSpec(key=key, label=label, argv=tuple(argv), ready_path="/", health_path="/")


def ensure_venv(
    venv: Path, packages: Sequence[str], check_code: str, log: Callable[[str], None]
) -> str | None:
    """Make sure ``venv`` has ``packages`` (``check_code`` must run); None, or why it cannot be used."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", check_code]
    if python.exists() and subprocess.run(check, capture_output=True, check=False).returncode == 0:
        return None
    log(f"installing {', '.join(packages)} into {venv.relative_to(ROOT)} (pip, once)")
    made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create {venv}: {made.stderr.strip()}"
    pip = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages],
        capture_output=True,
        text=True,
    )
    if pip.returncode != 0:
        return f"pip install {' '.join(packages)} failed: {pip.stderr.strip()[-500:]}"
    if subprocess.run(check, capture_output=True, check=False).returncode != 0:
        return f"{venv} was installed but its packages do not import"
    return None


def ensure_azureml_venv(log: Callable[[str], None]) -> str | None:
    """The azureml virtualenv: None when it works, else why not."""
    check = "import azureml_inference_server_http, onnxruntime, numpy"
    return ensure_venv(AZUREML_VENV, AZUREML_PACKAGES, check, log)


def ensure_mlserver_venv(log: Callable[[str], None]) -> str | None:
    """The MLServer virtualenv: None when it works, else why not."""
    check = (
        "import mlserver, onnxruntime, numpy, uvloop\n"
        "assert tuple(map(int, uvloop.__version__.split('.')[:2])) < (0, 22)"
    )
    return ensure_venv(MLSERVER_VENV, MLSERVER_PACKAGES, check, log)


def mlserver(key: str, label: str, model_dir: Path, name: str, work: Path) -> ServerSpec:
    """MLServer serving ``model_dir/model.onnx`` as ``name`` with the minimal onnxruntime runtime."""
    repo = work / "mlserver" / name
    repo.mkdir(parents=True, exist_ok=True)
    shutil.copy(MLSERVER_RUNTIME, repo / MLSERVER_RUNTIME.name)
    settings = {
        "name": name,
        "implementation": "onnx_runtime.OnnxRuntime",
        "parameters": {"uri": str(model_dir / "model.onnx")},
    }
    (repo / "model-settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    env = {
        "MLSERVER_HOST": "127.0.0.1",
        "MLSERVER_HTTP_PORT": "{port}",
        "MLSERVER_GRPC_PORT": str(free_port()),
        "MLSERVER_METRICS_PORT": str(free_port()),
    }
    return ServerSpec(
        key=key,
        label=label,
        argv=(str(MLSERVER_VENV / "bin" / "python"), "-m", "mlserver.cli.main", "start", str(repo)),
        env=env,
        ready_path=f"/v2/models/{name}/ready",
        health_path="/v2/health/live",
        score_path=f"/v2/models/{name}/infer",
        oip_model=name,
    )


def package_version(venv: Path, package: str) -> str | None:
    """The version of ``package`` installed in ``venv``, if any."""
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=False
    )
    return out.stdout.strip() or None


def http_get(url: str, timeout_s: float) -> int:
    """GET ``url``; the status code (0 when the connection failed)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, OSError):
        return 0


def http_post(url: str, body: bytes, timeout_s: float) -> tuple[int, bytes]:
    """POST a JSON body; status and response body."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return int(r.status), r.read()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read()


class RunningServer:
    """A started server: its URL, process tree and log."""

    def __init__(self, spec: ServerSpec, port: int, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.spec = spec
        self.port = port
        self.proc = proc
        self.log_path = log_path
        self.base = f"http://127.0.0.1:{port}"

    def url(self, path: str) -> str:
        """The full URL of ``path`` on this server."""
        return self.base + path

    def wait_ready(self, timeout_s: float) -> float:
        """Poll the ready path until 200; seconds it took. ServerError with the log tail otherwise."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            if self.proc.poll() is not None:
                raise ServerError(f"{self.spec.label} exited with {self.proc.returncode}:\n{self.log_tail()}")
            if http_get(self.url(self.spec.ready_path), timeout_s=2.0) == 200:
                return time.monotonic() - start
            time.sleep(0.2)
        raise ServerError(f"{self.spec.label} was not ready within {timeout_s:.0f}s:\n{self.log_tail()}")

    def memory_mb(self) -> tuple[float, float]:
        """(RSS, USS) in MiB of the server process and all its children (gunicorn workers)."""
        try:
            root = psutil.Process(self.proc.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return 0.0, 0.0
        rss = uss = 0
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                info = p.memory_full_info()
                rss += info.rss
                uss += info.uss
        return rss / 2**20, uss / 2**20

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of the server's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL after 10 s."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@contextlib.contextmanager
def running(spec: ServerSpec, log_dir: Path, ready_timeout_s: float = 120.0) -> Iterator[RunningServer]:
    """Start ``spec`` on a free loopback port, wait until ready, stop it on exit."""
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.key}.log"
    argv = [a.replace("{port}", str(port)) for a in spec.argv]
    env = {
        **os.environ,
        **{k: v.replace("{port}", str(port)) for k, v in spec.env.items()},
        "PYTHONUNBUFFERED": "1",
    }
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    server = RunningServer(spec, port, proc, log_path)
    try:
        server.wait_ready(ready_timeout_s)
        yield server
    finally:
        server.stop()
