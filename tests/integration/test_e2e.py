"""The whole system end to end: packaging, the cloud, a broker with ACLs, a real agent, a simulated fleet.

One rig per module: the session's registry and Docker Engine, the cpu base image, a cloud data
directory, Mosquitto started with the files ``edgectl broker config`` writes (no anonymous
access, per-device passwords and ACLs), the rollout controller (``edgectl deploy watch``) and one
real device (``edge-agent run`` with Docker Engine, provisioned by ``edgectl device add``), each
a subprocess. The tests run in order on that rig:

1. package digits:1 → deploy → score over HTTP; ``deploy set-model`` digits:2 → the module serves
   version 2; a version whose entry script raises in ``init()`` → the agent rolls back, the cloud
   shows ``rolled back`` and the module still serves version 2;
2. a broker restart changes nothing for the running module (same container, still serving);
3. 200 simulated devices (``edgectl simulate --provision``) converge on their own deployment.

Every wait is for a reported state or an HTTP answer, with a generous bound; nothing asserts on time.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import textwrap
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sqlalchemy import select

from cloud.cli import main as edgectl
from cloud.config import resolve_settings
from cloud.fleet.service import DeploymentProgress, Fleet
from cloud.fleet.sql import aware
from cloud.inference_config import InferenceConfig
from cloud.keys import load_or_create_signing_key
from cloud.packaging.models import models_from_registry
from cloud.packaging.package import PackageRequest, package
from cloud.store import Registry
from cloud.store.db import Database, open_database
from cloud.store.fleet import OnlineRecord, ReportedRecord
from modules.profiles import load_profiles
from tests.integration.module_image import CRASH_SOURCE
from tests.services import (
    REPO_ROOT,
    ManagedProcess,
    RegistryServer,
    ServiceUnavailable,
    find_binary,
    free_port,
    port_open,
    start_or_skip,
    wait_until,
)

pytestmark = pytest.mark.integration

DEVICE = "e2e-cam-1"
DEPLOYMENT = "e2e-vision"
MODULE = "e2e-digits"
"""The module (and so the container, ``edge-e2e-digits``): apart from other tests' ``digits``."""
MODEL = "digits"
REPOSITORY = "e2e-digits"
SIMULATED = 200
SIM_IMAGE = "registry.local/digits@sha256:" + "0" * 64
"""Simulated devices pull nothing; any pinned reference does."""
WAIT_S = 180.0
"""The bound on every wait (a failure message, never a timing assertion)."""


class Command(ManagedProcess):
    """A process of ours (``edge-agent``, ``edgectl``, ``mosquitto``) run like the test services."""

    def __init__(
        self, workdir: Path, name: str, argv: list[str], ready: Callable[[], bool], port: int | None = None
    ) -> None:
        self.name = name
        super().__init__(workdir, port)
        self._argv = argv
        self._ready = ready

    def argv(self) -> list[str]:
        return self._argv

    def ready(self) -> bool:
        return self._ready()


@dataclass
class Rig:
    """The running system and helpers to drive and read it."""

    root: Path
    data: Path
    registry: RegistryServer
    docker: Any
    broker: Command
    db: Database
    fleet: Fleet
    module_port: int
    images: dict[str, str]

    def cli(self, *args: str) -> str:
        """``edgectl ARGS`` in this process against the rig's data directory; its stdout."""
        return run_cli(self.data, *args)

    def progress(self, name: str = DEPLOYMENT) -> DeploymentProgress:
        """The cloud's view of a deployment's rollout."""
        return self.fleet.progress(name)

    def device(self, device: str = DEVICE) -> tuple[str, int | None]:
        """``(status, generation)`` of a device in the deployment, as the cloud shows it."""
        row = next(d for d in self.progress().devices if d.device == device)
        return row.status, row.generation

    def reported(self, device: str = DEVICE) -> dict[str, Any]:
        """The device's newest report as the controller stored it."""
        with self.db.transaction() as s:
            row = s.get(ReportedRecord, device)
            return json.loads(row.payload) if row is not None else {}

    def wait(self, check: Callable[[], Any], what: str) -> None:
        """Wait for ``check`` (errors count as not yet); fail with what was last seen."""

        def safe() -> bool:
            with contextlib.suppress(Exception):
                return bool(check())
            return False

        if not wait_until(safe, WAIT_S):
            pytest.fail(f"gave up waiting for {what}; device report: {json.dumps(self.reported())[:1500]}")

    def score(self) -> tuple[int, list[str]]:
        """``(label, model versions)`` from the real device's module over HTTP."""
        base = f"http://127.0.0.1:{self.module_port}"
        request = urllib.request.Request(
            base + "/score", data=json.dumps(SAMPLE).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.loads(response.read())
        with urllib.request.urlopen(f"{base}/v2/models/{MODEL}", timeout=10) as response:
            info = json.loads(response.read())
        return int(answer["outputs"]["label"][0]), [str(v) for v in info["versions"]]


def run_cli(data: Path, *args: str) -> str:
    """``edgectl ARGS --data-dir DATA`` in this process; its stdout (fails the test on an error)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = edgectl([*args, "--data-dir", str(data)])
    assert code == 0, f"edgectl {' '.join(args)} exited {code}: {err.getvalue()[-2000:]}"
    return out.getvalue()


def _sample() -> dict[str, Any]:
    from sklearn.datasets import load_digits

    x, _ = load_digits(return_X_y=True)
    return {"data": [(x[7] / 16.0).astype(np.float32).tolist()]}


SAMPLE = _sample()


def train(folder: Path, hidden: tuple[int, ...], seed: int) -> tuple[Path, int]:
    """A digits model and the label it gives the sample (computed here with onnxruntime)."""
    import onnxruntime as ort

    from tests.integration.test_packaging import train_digits

    train_digits(folder, hidden, seed)
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    label = session.run(["label"], {"float_input": np.array(SAMPLE["data"], dtype=np.float32)})[0]
    return folder / "model.onnx", int(label[0])


def _online(db: Database, device: str) -> bool:
    with db.transaction() as s:
        row = s.get(OnlineRecord, device)
        return row is not None and row.online


def _container(client: Any) -> Any:
    [container] = client.containers.list(
        filters={"label": ["io.edgedeploy.managed=true", f"io.edgedeploy.device={DEVICE}"]}
    )
    return container


def _python(*args: str) -> list[str]:
    """Our Python with this checkout importable (the services run in their own folders)."""
    return ["env", f"PYTHONPATH={REPO_ROOT}", sys.executable, *args]


def _log_says(path: Path, text: str) -> bool:
    return path.exists() and text in path.read_text(errors="replace")


@pytest.fixture(scope="module")
def rig(
    request: pytest.FixtureRequest,
    registry: RegistryServer,
    docker_client: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Rig]:
    from tests.integration.test_base_image import cpu_base_or_skip, forget_reference

    cpu_base_or_skip(registry, docker_client)
    root = tmp_path_factory.mktemp("e2e")
    data = root / "data"
    mosquitto = find_binary("mosquitto")
    if mosquitto is None:
        pytest.skip("REAL PART UNAVAILABLE: mosquitto not installed (apt-get install mosquitto)")
    started: list[ManagedProcess] = []

    def start(process: Command, part: str) -> Command:
        def go() -> Command:
            started.append(process)
            process.start()
            return process

        return start_or_skip(request.config, part, go)

    def cli(*args: str) -> str:
        return run_cli(data, *args)

    db: Database | None = None
    try:
        port = free_port()
        cli(
            "broker",
            "config",
            "--out",
            str(data / "broker"),
            "--port",
            str(port),
            "--cloud-port",
            str(free_port()),
        )
        conf = data / "broker" / "mosquitto.conf"
        broker = start(
            Command(
                root, "mosquitto", [mosquitto, "-c", str(conf)], lambda: port_open("127.0.0.1", port), port
            ),
            "mosquitto",
        )
        agent_dir = root / "device"
        cli(
            "device", "add", DEVICE, "--profile", "cpu", "--runtime", "docker",
            "--out", str(agent_dir), "--state-dir", str(agent_dir / "state"),
        )  # fmt: skip
        config = yaml.safe_load((agent_dir / "agent.yaml").read_text())
        config["heartbeat_s"] = 5
        (agent_dir / "agent.yaml").write_text(yaml.safe_dump(config))
        watch = _python("-m", "cloud.cli", "deploy", "watch", "--interval", "0.5", "--data-dir", str(data))
        start(
            Command(root, "controller", watch, lambda: _log_says(root / "controller.log", "watching")),
            "mosquitto",
        )
        db = open_database(resolve_settings(data).db_url)
        agent = _python("-m", "agent", "run", "--config", str(agent_dir / "agent.yaml"))
        start(Command(root, "agent", agent, lambda: _online(db, DEVICE)), "docker")
        fleet = Fleet(db, load_or_create_signing_key(data), load_profiles())
        yield Rig(root, data, registry, docker_client, broker, db, fleet, free_port(), {})
    finally:
        for process in reversed(started):
            process.stop()
        if db is not None:
            db.dispose()
        filters = {"label": [f"io.edgedeploy.device={DEVICE}"]}
        for container in docker_client.containers.list(all=True, filters=filters):
            container.remove(force=True)
        for image in docker_client.images.list():
            for name in [*image.tags, *(image.attrs.get("RepoDigests") or [])]:
                if name.startswith(f"{registry.address}/{REPOSITORY}"):
                    forget_reference(docker_client, name)


def _package(rig: Rig, store: Registry, ref: str) -> str:
    try:
        [image] = package(
            PackageRequest(
                models=models_from_registry(store, [ref]),
                config=InferenceConfig(),
                profiles=["cpu"],
                registry=rig.registry.address,
                name=MODULE,
                repository=REPOSITORY,
                smoke=False,
            ),
            client=rig.docker,
            cache_dir=rig.data / "packaging",
        )
    except ServiceUnavailable as exc:  # pragma: no cover - the base fixture skips first
        pytest.skip(exc.reason)
    assert image.ref is not None
    return image.ref


def test_package_deploy_update_and_roll_back(rig: Rig, tmp_path: Path) -> None:
    store = Registry.open(resolve_settings(rig.data))
    try:
        model_1, label_1 = train(tmp_path / "v1", (32,), seed=0)
        model_2, label_2 = train(tmp_path / "v2", (48,), seed=1)
        store.register(model_1.parent, "digits")
        store.register(model_2.parent, "digits")
        rig.images["1"] = _package(rig, store, "digits:1")
    finally:
        store.close()

    manifest = {
        "name": DEPLOYMENT,
        "target": {"device_ids": [DEVICE]},
        "modules": {
            MODULE: {
                "images": {"cpu": rig.images["1"]},
                "ports": [{"container": 5001, "host": rig.module_port}],
                "health": {"interval_s": 0.5, "timeout_s": 2, "failure_threshold": 3},
            }
        },
        "health_deadline_s": 20,
    }
    (tmp_path / "deployment.json").write_text(json.dumps(manifest))
    rig.cli("deploy", "apply", "-f", str(tmp_path / "deployment.json"), "--model", "digits:1")
    rig.wait(lambda: rig.device() == ("healthy", 1), "the real device healthy on generation 1")
    assert rig.score() == (label_1, ["1"])
    assert rig.reported()["modules"][MODULE]["image_digest"] in rig.images["1"]

    out = rig.cli("deploy", "set-model", DEPLOYMENT, MODULE, "digits:2", "--repository", REPOSITORY,
                  "--registry", rig.registry.address, "--no-smoke")  # fmt: skip
    assert f"deployment {DEPLOYMENT} now uses digits:2" in out
    rig.images["2"] = rig.fleet.manifest(DEPLOYMENT)[0].modules[MODULE].images["cpu"]
    rig.wait(lambda: rig.device() == ("healthy", 2), "the real device healthy on generation 2")
    assert rig.score() == (label_2, ["2"])

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "crash_score.py").write_text(textwrap.dedent(CRASH_SOURCE))
    (broken / "inference.yaml").write_text("entry_script: crash_score.py\n")
    rig.cli("deploy", "set-model", DEPLOYMENT, MODULE, "digits:2", "--config", str(broken / "inference.yaml"),
            "--repository", REPOSITORY, "--registry", rig.registry.address, "--no-smoke")  # fmt: skip
    rig.images["3"] = rig.fleet.manifest(DEPLOYMENT)[0].modules[MODULE].images["cpu"]
    assert rig.images["3"] != rig.images["2"]
    rig.wait(lambda: rig.device() == ("rolled back", 3), "the agent to roll generation 3 back")
    report = rig.reported()
    assert report["deployment_status"] == "rolled_back"
    assert report["generation_received"] == 3
    assert report["generation_applied"] == 2
    assert "generation 3 not healthy" in report["reason"] and "exited with code 3" in report["reason"]
    rig.wait(lambda: rig.score() == (label_2, ["2"]), "the restored module serving version 2 again")
    rig.wait(lambda: _runs(rig.reported(), rig.images["2"]), "a report of version 2's image running")
    assert rig.device() == ("rolled back", 3)
    rig.wait(lambda: rig.progress().rollout_state == "halted", "the rollout to halt")


def _runs(report: dict[str, Any], image: str) -> bool:
    module = report["modules"][MODULE]
    return bool(module["runtime_status"] == "running" and module["image_digest"] in image)


def test_broker_restart_changes_nothing_for_the_running_module(rig: Rig) -> None:
    if "2" not in rig.images:
        pytest.skip("runs on the module test_package_deploy_update_and_roll_back leaves running")
    rig.wait(lambda: rig.score()[1] == ["2"], "the module serving version 2")
    before = _container(rig.docker)
    started_at = before.attrs["State"]["StartedAt"]
    restarted_at = datetime.now(timezone.utc)

    rig.broker.restart()

    def fresh_report() -> bool:
        with rig.db.transaction() as s:
            row = s.get(ReportedRecord, DEVICE)
            received = row.received_at if row is not None else None
        return received is not None and aware(received) > restarted_at

    rig.wait(fresh_report, "a report through the restarted broker")
    after = _container(rig.docker)
    after.reload()
    assert after.id == before.id
    assert after.attrs["State"]["StartedAt"] == started_at
    assert after.attrs["RestartCount"] == before.attrs["RestartCount"]
    assert rig.score()[1] == ["2"]
    report = rig.reported()
    assert report["generation_applied"] == 2
    assert report["modules"][MODULE]["runtime_status"] == "running"


def test_simulated_fleet_converges(rig: Rig, tmp_path: Path) -> None:
    simulator = Command(
        tmp_path,
        "simulator",
        _python(
            "-m", "cloud.cli", "simulate", "--devices", str(SIMULATED), "--provision", "--quiet",
            "--pull-s", "0.05-0.5", "--ready-s", "0.1-0.5", "--heartbeat", "30", "--data-dir", str(rig.data),
        ),
        lambda: True,
    )  # fmt: skip
    simulator.start()
    try:
        manifest = {
            "name": "e2e-sim-fleet",
            "target": {"tags": {"simulated": "true"}},
            "modules": {MODULE: {"images": {"cpu": SIM_IMAGE}, "health": {"interval_s": 1}}},
            "rollout": {"waves": ["10%", "100%"]},
        }
        (tmp_path / "fleet.json").write_text(json.dumps(manifest))

        def provisioned() -> bool:
            with rig.db.transaction() as s:
                from cloud.store.devices import Device

                return len(s.scalars(select(Device.id).where(Device.id.like("sim-%"))).all()) == SIMULATED

        rig.wait(provisioned, f"{SIMULATED} simulated devices provisioned")
        rig.cli("deploy", "apply", "-f", str(tmp_path / "fleet.json"))

        def converged() -> bool:
            p = rig.progress("e2e-sim-fleet")
            healthy = sum(1 for d in p.devices if d.status == "healthy")
            return p.rollout_state == "complete" and healthy == SIMULATED

        rig.wait(converged, f"{SIMULATED} simulated devices healthy")
        progress = rig.progress("e2e-sim-fleet")
        assert [w.devices for w in progress.waves] == [20, 180]
        assert {d.generation for d in progress.devices} == {1}
    finally:
        simulator.stop()
