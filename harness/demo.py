"""The one-command demo: a real device and a simulated fleet, from a trained model to a rolling update.

``run_demo`` drives the operator's own tools (``edgectl`` subcommands, ``edge-agent``, Mosquitto, the
CNCF registry, Docker Engine), all on 127.0.0.1 and free ports, with its files under one work folder
(default ``.work/demo``; the previous run's files are removed first):

1. start an image registry (``docker-registry serve``) and Mosquitto with the files from
   ``edgectl broker config`` (no anonymous access, per-device passwords and ACLs);
2. build the cpu base image (cached in Docker Engine by its inputs) and push it;
3. train the digits model (scikit-learn's bundled data), register it, package it;
4. provision one real device (``edge-agent`` with Docker Engine) and N simulated ones
   (``edgectl simulate --provision``), start the rollout controller (``edgectl deploy watch``);
5. apply a deployment in waves, follow it until every device is healthy, score the real device's
   module over HTTP and print the fleet;
6. train and register a second model version and roll it out with ``edgectl deploy set-model``:
   only the model layer is new, so only it is pushed and pulled.

Everything the demo started is stopped when it ends, fails or is interrupted (Ctrl-C): the
processes, the real device's containers and the module images it pulled.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

REAL_DEVICE = "demo-cam-1"
DEPLOYMENT = "digits-demo"
MODULE = "digits"
MODEL = "digits"
START_TIMEOUT_S = 30.0
ROLLOUT_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 10.0
MARKER = ".edgedeploy-demo"
ACCESS_LINE = re.compile(
    r'"GET (?P<path>/v2/\S+) HTTP/[0-9.]+" (?P<status>\d{3}) (?P<bytes>\d+) "[^"]*" "(?P<agent>[^"]*)"'
)


class DemoError(Exception):
    """A step of the demo failed; the message says which and where its log is."""


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs."""

    work: Path
    simulated: int = 50
    waves: tuple[str, ...] = ("1", "10", "100%")
    out: TextIO = sys.stdout


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def http_json(url: str, body: bytes | None = None, timeout: float = 10.0) -> Any:
    """GET (or POST ``body`` as JSON) and decode the JSON answer; raises on errors."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=body, headers=headers)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


@dataclass
class Service:
    """A background process the demo started, with its log file."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.process.poll() is None

    def tail(self, lines: int = 15) -> str:
        """The last lines of the log."""
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join("      " + line for line in text[-lines:])

    def stop(self) -> None:
        """SIGTERM to the service's process group (it runs in its own session), then SIGKILL after
        ``STOP_TIMEOUT_S``: children it started go too."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


@dataclass
class Demo:
    """One run of the demo: its folders, services and the facts later steps need."""

    options: DemoOptions
    services: list[Service] = field(default_factory=list)
    registry: str = ""
    broker_url: str = ""
    images: dict[int, str] = field(default_factory=dict)
    module_port: int = 0
    started: float = field(default_factory=time.monotonic)
    step_no: int = 0

    STEPS = 7

    # ---- paths and output ----------------------------------------------------------------------

    @property
    def work(self) -> Path:
        """The demo's work folder."""
        return self.options.work

    @property
    def data(self) -> Path:
        """The cloud's data directory."""
        return self.work / "data"

    @property
    def logs(self) -> Path:
        """Where the services' logs go."""
        return self.work / "logs"

    def say(self, text: str) -> None:
        """A progress line."""
        print(f"[demo] {text}", file=self.options.out, flush=True)

    def step(self, title: str) -> None:
        """The heading of the next step, with the time since the start."""
        self.step_no += 1
        elapsed = time.monotonic() - self.started
        print(
            f"\n\033[1m[demo] {self.step_no}/{self.STEPS} {title}\033[0m  (+{elapsed:.0f} s)",
            file=self.options.out,
            flush=True,
        )

    # ---- running things ------------------------------------------------------------------------

    def env(self) -> dict[str, str]:
        """The environment of every command: the demo's data directory, nothing inherited from
        an operator's own ``EDGE_*`` settings."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
        env["EDGE_DATA_DIR"] = str(self.data)
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def edgectl(self, *args: str, want_json: bool = False, quiet: bool = False) -> Any:
        """Run ``edgectl ARGS``; its stderr (progress) is shown indented, stdout returned (parsed
        with ``want_json``). DemoError naming the command when it fails."""
        argv = [sys.executable, "-m", "cloud.cli", *args, *(["--json"] if want_json else [])]
        self.say("$ edgectl " + " ".join(args))
        # stdout goes to a file, not a pipe: only stderr is read live, so a large result cannot
        # fill a pipe nobody reads and stall the command.
        with tempfile.TemporaryFile(mode="w+") as stdout:
            process = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, env=self.env(), text=True)
            assert process.stderr is not None
            errors: list[str] = []
            try:
                for line in process.stderr:
                    errors.append(line.rstrip())
                    if not quiet:
                        print("      " + line.rstrip(), file=self.options.out, flush=True)
                process.wait()
            except BaseException:
                process.terminate()
                try:
                    process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
                raise
            stdout.seek(0)
            out = stdout.read()
        if process.returncode != 0:
            shown = "" if not quiet else "\n" + "\n".join(errors[-10:])
            raise DemoError(f"edgectl {' '.join(args)} failed (exit {process.returncode}){shown}")
        if want_json:
            return json.loads(out)
        for line in out.splitlines():
            print("      " + line, file=self.options.out, flush=True)
        return out

    def start(self, name: str, argv: Sequence[str], ready: Callable[[], bool] | None = None) -> Service:
        """Start a background service (its own session, so Ctrl-C reaches only the demo) and wait
        until ``ready`` says so."""
        log = self.logs / f"{name}.log"
        with log.open("ab") as fh:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=self.env(),
                start_new_session=True,
            )
        service = Service(name, process, log)
        self.services.append(service)
        self.say(f"started {name} (pid {process.pid}; log {log})")
        if ready is not None:
            self.wait(ready, f"{name} to be ready", START_TIMEOUT_S, service)
        return service

    def wait(
        self, check: Callable[[], Any], what: str, limit_s: float, service: Service | None = None
    ) -> Any:
        """Poll ``check`` until it returns something truthy; DemoError after ``limit_s``."""
        deadline = time.monotonic() + limit_s
        while True:
            result = check()
            if result:
                return result
            if service is not None and not service.alive():
                raise DemoError(
                    f"{service.name} exited (status {service.process.returncode}):\n{service.tail()}"
                )
            if time.monotonic() > deadline:
                hint = f"\n{service.tail()}" if service is not None else ""
                raise DemoError(f"gave up waiting for {what} after {limit_s:.0f} s{hint}")
            time.sleep(0.25)

    def stop_all(self) -> None:
        """Stop every service (newest first), the real device's containers and pulled module images."""
        for service in reversed(self.services):
            if service.alive():
                self.say(f"stopping {service.name} (pid {service.process.pid})")
                service.stop()
        self.services.clear()
        self._remove_docker_leftovers()

    def _remove_docker_leftovers(self) -> None:
        try:
            import docker
        except ImportError:
            return
        with contextlib.suppress(Exception):
            client = docker.from_env(timeout=30)
            filters = {"label": ["io.edgedeploy.managed=true", f"io.edgedeploy.device={REAL_DEVICE}"]}
            for container in client.containers.list(all=True, filters=filters):
                self.say(f"removing container {container.name}")
                container.remove(force=True)
            if self.registry:
                for image in client.images.list():
                    for name in [*image.tags, *(image.attrs.get("RepoDigests") or [])]:
                        if name.startswith(self.registry + "/"):
                            with contextlib.suppress(Exception):
                                client.images.remove(name, noprune=False)
            client.close()


def train_digits(out: Path, hidden: tuple[int, ...], seed: int) -> Path:
    """A second digits model (different hidden layer and seed) as ``out/model.onnx``."""
    import warnings

    import numpy as np
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=300, random_state=seed).fit(x, y)
    onx = to_onnx(
        clf,
        initial_types=[("float_input", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
        target_opset=17,
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "model.onnx").write_bytes(onx.SerializeToString())
    return out / "model.onnx"


def _layers(registry: str, ref: str) -> dict[str, int]:
    """``{layer digest: compressed size}`` of an image in the registry, from its manifest."""
    from cloud.packaging.registry_client import RegistryClient

    name, _, digest = ref.partition("@")
    repository = name.removeprefix(registry + "/")
    found = RegistryClient(registry).get_manifest(repository, digest)
    if found is None:
        raise DemoError(f"the registry {registry} has no manifest for {ref}")
    manifest = json.loads(found[0])
    return {layer["digest"]: int(layer["size"]) for layer in manifest["layers"]}


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    cells = [[str(c) for c in header], *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


class DemoRun(Demo):
    """The demo's steps, in order (``run``)."""

    def run(self) -> None:
        """Every step; raises DemoError (or KeyboardInterrupt) on the way out, stops nothing."""
        self.prepare()
        self.start_registry_and_broker()
        self.base_image()
        v1 = self.model_v1()
        self.start_fleet()
        self.deploy(v1)
        self.score(v1, expect_version=1)
        self.fleet_table()
        self.update_model()

    # ---- 1 -------------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Check the real parts exist and give the demo a clean work folder."""
        self.step("prerequisites: Docker Engine, Mosquitto, the registry")
        missing = [b for b in ("mosquitto", "docker-registry") if shutil.which(b) is None]
        if missing:
            raise DemoError(f"not installed: {', '.join(missing)} (run: bash scripts/bootstrap.sh)")
        try:
            import docker

            client = docker.from_env(timeout=30)
            version = client.version().get("Version", "?")
            client.close()
        except Exception as e:
            raise DemoError(
                f"Docker Engine is not answering ({type(e).__name__}: {e}); start it with "
                "bash scripts/bootstrap.sh (runs dockerd as root)"
            ) from e
        self.say(f"Docker Engine {version}; mosquitto and docker-registry found")
        marker = self.work / MARKER
        if self.work.exists() and any(self.work.iterdir()):
            earlier = marker.exists() or all(p.suffix == ".log" for p in self.work.iterdir())
            if not earlier:
                raise DemoError(
                    f"{self.work} is not empty and not a demo work folder (no {MARKER}); give another --work"
                )
            self.say(f"removing the previous run's files in {self.work}")
            shutil.rmtree(self.work)
        self.logs.mkdir(parents=True)
        marker.write_text("edgectl demo work folder: emptied by the next run\n")
        self.say(f"work folder {self.work} (cloud data: {self.data}; logs: {self.logs})")

    def start_registry_and_broker(self) -> None:
        """The image registry and Mosquitto (with the generated password and ACL files)."""
        self.step("image registry and MQTT broker on 127.0.0.1")
        port = free_port()
        self.registry = f"127.0.0.1:{port}"
        storage = self.work / "registry"
        storage.mkdir()
        config = storage / "config.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: warn\n"
            f"storage:\n  filesystem:\n    rootdirectory: {storage / 'data'}\n  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.registry}\n"
        )

        def registry_up() -> bool:
            try:
                with urllib.request.urlopen(f"http://{self.registry}/v2/", timeout=2):
                    return True
            except OSError:
                return False

        self.start("registry", ["docker-registry", "serve", str(config)], registry_up)
        broker_port = free_port()
        broker_dir = self.data / "broker"
        self.edgectl(
            "broker", "config", "--out", str(broker_dir),
            "--port", str(broker_port), "--cloud-port", str(free_port()),
        )  # fmt: skip
        self.broker_url = f"mqtt://127.0.0.1:{broker_port}"
        self.start(
            "mosquitto",
            ["mosquitto", "-c", str(broker_dir / "mosquitto.conf")],
            lambda: _port_open(broker_port),
        )

    # ---- 2, 3 ----------------------------------------------------------------------------------

    def base_image(self) -> None:
        """The cpu base image: built from Debian and PyPI the first time, then cached."""
        self.step("cpu base image (Debian + Python + onnxruntime; cached after the first build)")
        self.edgectl("base", "build", "--profile", "cpu", "--registry", self.registry)

    def model_v1(self) -> Path:
        """Train, register and package the digits model; returns the folder with its sample."""
        from modules.examples.digits import build_digits_onnx

        self.step("train the digits model, register it, package it into a module image")
        folder = self.work / "models" / "v1"
        self.say("training an MLP on scikit-learn's bundled digits (64 inputs, 10 classes)")
        model = build_digits_onnx(folder)
        self.edgectl("model", "register", str(model), "--name", MODEL, "--tag", "demo=v1")
        packaged = self.package(1)
        image = self._image_of(packaged)
        self._forget_local_build(packaged, 1)
        self.images[1] = image
        self.say(f"module image: {image}")
        return folder

    def package(self, version: int) -> Any:
        """``edgectl package`` of the model version for the cpu profile; its JSON output."""
        ref = f"{MODEL}:{version}"
        return self.edgectl(
            "package", "--model", ref, "--profile", "cpu", "--registry", self.registry, want_json=True
        )

    @staticmethod
    def _image_of(packaged: Any) -> str:
        for entry in packaged:
            if entry.get("profile") == "cpu" and entry.get("image"):
                return str(entry["image"])
        raise DemoError(f"edgectl package printed no pushed cpu image: {json.dumps(packaged)[:300]}")

    # ---- 4 -------------------------------------------------------------------------------------

    def start_fleet(self) -> None:
        """One real device (edge-agent + Docker Engine), N simulated ones, the rollout controller."""
        n = self.options.simulated
        self.step(f"devices: 1 real (edge-agent + Docker Engine) and {n} simulated; rollout controller")
        agent_dir = self.work / "devices" / REAL_DEVICE
        self.edgectl(
            "device", "add", REAL_DEVICE, "--profile", "cpu", "--tag", "site=lab",
            "--runtime", "docker", "--out", str(agent_dir), "--state-dir", str(agent_dir / "state"),
        )  # fmt: skip
        self.start("controller", [sys.executable, "-m", "cloud.cli", "deploy", "watch", "--interval", "1"])
        self.start(
            f"agent {REAL_DEVICE}",
            [sys.executable, "-m", "agent", "run", "--config", str(agent_dir / "agent.yaml")],
        )
        if n:
            self.start(
                "simulator",
                [
                    sys.executable, "-m", "cloud.cli", "simulate", "--devices", str(n), "--provision",
                    "--pull-s", "0.5-3", "--ready-s", "0.5-2", "--heartbeat", "30", "--progress", "5",
                ],
            )  # fmt: skip
        self.wait(lambda: self._online() >= n + 1, f"{n + 1} devices online", 60)
        self.say(f"{self._online()} devices online")

    def _online(self) -> int:
        from sqlalchemy import func, select

        from cloud.store.fleet import OnlineRecord

        with self._db() as db, db.transaction() as s:
            return int(s.scalar(select(func.count()).where(OnlineRecord.online.is_(True))) or 0)

    @contextlib.contextmanager
    def _db(self) -> Iterator[Any]:
        from cloud.store.db import open_database

        db = open_database(f"sqlite:///{self.data / 'edgedeploy.db'}")
        try:
            yield db
        finally:
            db.dispose()

    # ---- 5 -------------------------------------------------------------------------------------

    def deploy(self, v1: Path) -> None:
        """Apply the deployment and follow its waves until every device is healthy."""
        self.step(f"deploy the module to every cpu device in waves {', '.join(self.options.waves)}")
        self.module_port = free_port()
        manifest = {
            "name": DEPLOYMENT,
            "target": {"profile": "cpu"},
            "modules": {
                MODULE: {
                    "images": {"cpu": self.images[1]},
                    "ports": [{"container": 5001, "host": self.module_port}],
                    "health": {"interval_s": 2},
                }
            },
            "rollout": {"waves": list(self.options.waves), "max_failure_ratio": 0.1},
            "health_deadline_s": 120,
        }
        path = self.work / "deployment.json"
        path.write_text(json.dumps(manifest, indent=2) + "\n")
        mark = self._registry_log_size()
        self.edgectl("deploy", "apply", "-f", str(path), "--model", f"{MODEL}:1")
        self.follow(generation=None)
        self.say_pulled(mark, self.images[1], "version 1")

    def follow(self, generation: int | None) -> None:
        """Print the rollout's progress until it completes (DemoError when it halts or stalls)."""
        from cloud.fleet.service import Fleet
        from modules.profiles import load_profiles

        started = time.monotonic()
        last = ""
        with self._db() as db:
            fleet = Fleet(db, _no_key(), load_profiles())
            while True:
                p = fleet.progress(DEPLOYMENT)
                fresh = [d for d in p.devices if generation is None or (d.generation or 0) >= generation]
                done = sum(1 for d in fresh if d.status == "healthy")
                waves = "  ".join(
                    f"wave {w.index + 1}: "
                    + (" ".join(f"{k}={v}" for k, v in sorted(w.counts.items())) if w.started else "waiting")
                    for w in p.waves
                )
                line = f"rollout {p.rollout_state}: {done}/{len(p.devices)} healthy | {waves}"
                if line != last:
                    self.say(f"{time.monotonic() - started:5.1f} s  {line}")
                    last = line
                if p.rollout_state in ("halted", "reverted"):
                    raise DemoError(f"the rollout {p.rollout_state}: {p.rollout_message}")
                if p.rollout_state == "complete" and done == len(p.devices):
                    self.say(f"all {done} devices healthy after {time.monotonic() - started:.1f} s")
                    return
                if time.monotonic() - started > ROLLOUT_TIMEOUT_S:
                    raise DemoError(f"the rollout did not complete within {ROLLOUT_TIMEOUT_S:.0f} s: {line}")
                time.sleep(0.5)

    def score(self, model: Path, expect_version: int) -> None:
        """POST a test digit to the real device's module and print the prediction."""
        self.say(
            f"scoring the real device's module over HTTP: POST http://127.0.0.1:{self.module_port}/score"
        )
        base = f"http://127.0.0.1:{self.module_port}"
        sample = (model / "sample.json").read_bytes()
        truth = json.loads((model / "expected.json").read_text())["label"]
        answer = http_json(base + "/score", sample)
        label = answer["outputs"]["label"][0]
        confidence = max(answer["outputs"]["probabilities"][0])
        info = http_json(f"{base}/v2/models/{MODEL}")
        version = info.get("versions", ["?"])
        self.say(
            f"predicted digit {label} (p={confidence:.3f}); true label {truth}; "
            f"served model {info.get('name')} versions {version}"
        )
        if str(expect_version) not in [str(v) for v in version]:
            raise DemoError(f"the module serves {version}, expected version {expect_version}")

    def fleet_table(self, limit: int = 12) -> None:
        """Device, profile, module, status, provider and probe latency from the devices' reports."""
        from sqlalchemy import select

        from cloud.store.devices import Device
        from cloud.store.fleet import ReportedRecord

        with self._db() as db, db.transaction() as s:
            profiles = dict(s.execute(select(Device.id, Device.profile)).all())
            reports = {r.device_id: json.loads(r.payload) for r in s.scalars(select(ReportedRecord))}
        rows = []
        for device in sorted(profiles, key=lambda d: (d != REAL_DEVICE, d)):
            report = reports.get(device, {})
            module = report.get("modules", {}).get(MODULE, {})
            health = module.get("health") or {}
            latency = health.get("latency_ms")
            rows.append(
                (
                    device + (" (real)" if device == REAL_DEVICE else ""),
                    profiles[device],
                    f"{MODULE} g{report.get('generation_applied', '-')}",
                    f"{report.get('deployment_status', '-')}/{module.get('runtime_status', '-')}",
                    module.get("execution_provider") or "-",
                    "-" if latency is None else f"{latency:.1f} ms",
                )
            )
        header = ("DEVICE", "PROFILE", "MODULE", "STATUS", "PROVIDER", "PROBE LATENCY")
        lines = _table(header, rows[:limit])
        self.say(f"fleet ({len(rows)} devices; status = deployment/module as the devices report it):")
        for line in lines:
            print("      " + line, file=self.options.out)
        if len(rows) > limit:
            counts: dict[str, int] = {}
            for row in rows[limit:]:
                counts[row[3]] = counts.get(row[3], 0) + 1
            summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
            print(f"      ... and {len(rows) - limit} more: {summary}", file=self.options.out, flush=True)

    # ---- 6 -------------------------------------------------------------------------------------

    def update_model(self) -> None:
        """Register a second model version and roll it out: only the model layer moves."""
        self.step("second model version: rolling update that moves only the model layer")
        folder = self.work / "models" / "v2"
        self.say("training version 2: hidden layer 96 units, another seed")
        model = train_digits(folder, (96,), seed=7)
        for name in ("sample.json", "expected.json"):
            shutil.copy(self.work / "models" / "v1" / name, folder / name)
        self.edgectl("model", "register", str(model), "--name", MODEL, "--tag", "demo=v2")
        packaged = self.package(2)
        self.images[2] = self._image_of(packaged)
        old, new = _layers(self.registry, self.images[1]), _layers(self.registry, self.images[2])
        moved = {d: s for d, s in new.items() if d not in old}
        self.say(
            f"version 2 image: {len(new)} layers, {len(new) - len(moved)} shared with version 1; "
            f"new: {len(moved)} layer(s), {_human(sum(moved.values()))} of {_human(sum(new.values()))}"
        )
        self._forget_local_build(packaged, 2)
        mark = self._registry_log_size()
        manifest = json.loads((self.work / "deployment.json").read_text())
        manifest["modules"][MODULE]["images"]["cpu"] = self.images[2]
        path = self.work / "deployment-v2.json"
        path.write_text(json.dumps(manifest, indent=2) + "\n")
        self.edgectl("deploy", "apply", "-f", str(path), "--model", f"{MODEL}:2")
        self.follow(generation=2)
        self.score(folder, expect_version=2)
        self.fleet_table()
        self.say_pulled(mark, self.images[2], "version 2")

    def say_pulled(self, mark: int, image: str, what: str) -> None:
        """What the real device's Docker Engine downloaded from the registry since ``mark``."""
        blobs, manifests = self._pulled_since(mark)
        layers = _layers(self.registry, image)
        pulled = {d: n for d, n in blobs.items() if d in layers}
        config = sum(n for d, n in blobs.items() if d not in layers)
        names = ", ".join(f"{d[7:19]} {_human(n)}" for d, n in pulled.items()) or "none"
        self.say(
            f"the real device pulled {what}: {len(pulled)} of {len(layers)} layers, "
            f"{_human(sum(pulled.values()))} ({names}), plus {manifests} manifest(s) and "
            f"{_human(config)} of image config (the registry's access log; layers Docker Engine already "
            "holds are not fetched again)"
        )

    def _forget_local_build(self, packaged: Any, version: int) -> None:
        """Drop the build's local copy of version 2: the build host and the real device share this
        machine's Docker Engine, and a remote device would not have it either."""
        import docker

        client = docker.from_env(timeout=30)
        try:
            for entry in packaged:
                if entry.get("local_tag"):
                    with contextlib.suppress(docker.errors.ImageNotFound):
                        client.images.remove(entry["local_tag"])
        finally:
            client.close()
        self.say(
            f"removed the build's local copy of version {version} from Docker Engine (the build and the "
            "real device share it here), so the device pulls from the registry as a remote one would"
        )

    def _registry_log_size(self) -> int:
        return (self.logs / "registry.log").stat().st_size

    def _pulled_since(self, offset: int) -> tuple[dict[str, int], int]:
        """Blob downloads ``{digest: bytes}`` and manifest GETs Docker Engine made since ``offset``
        of the registry's access log."""
        with (self.logs / "registry.log").open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode(errors="replace")
        blobs: dict[str, int] = {}
        manifests = 0
        for match in ACCESS_LINE.finditer(text):
            if not match["agent"].startswith("docker/"):
                continue
            if "/blobs/" in match["path"] and match["status"] == "200":
                blobs[match["path"].rpartition("/")[2]] = int(match["bytes"])
            elif "/manifests/" in match["path"]:
                manifests += 1
        return blobs, manifests


def _no_key() -> Any:
    """A throwaway signing key: the demo only reads progress with it, the controller signs."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


def run_demo(options: DemoOptions) -> int:
    """Run the demo; stop everything it started whatever happens. 0 ok, 1 failed, 130 interrupted."""
    demo = DemoRun(options)

    def terminate(signum: int, _frame: object) -> None:
        for sig in previous:  # Ctrl-C reaches demo.sh too, which then sends SIGTERM: stop once
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, terminate) for sig in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        demo.run()
        elapsed = time.monotonic() - demo.started
        demo.say(f"demo finished in {elapsed:.0f} s; logs in {demo.logs}")
    except DemoError as e:
        demo.say(f"FAILED: {e}")
        code = 1
    except KeyboardInterrupt:
        demo.say("interrupted: stopping what the demo started")
        code = 130
    finally:
        for sig in previous:  # a second Ctrl-C must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        demo.stop_all()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code
