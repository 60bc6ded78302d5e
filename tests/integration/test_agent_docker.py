"""The agent end to end with DockerRuntime: real Mosquitto, real Docker Engine, a real module image.

The module image is built FROM the cpu base image (``tests/integration/module_image.py``) and
serves the digits model; ``ENTRY_SCRIPT=/module/src/crash_score.py`` makes it crash at start-up.
Containers are labelled with a per-test device id and removed at the end. Rejections, commands and
a broker restart do not depend on the runtime: ``test_agent_process.py`` covers them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.runtime import labels as lb
from agent.runtime.docker import DockerRuntime
from tests.integration import module_image as images
from tests.integration.agent_rig import (
    CloudSide,
    Keys,
    agent_config,
    desired_state,
    fast_health,
    module_running,
    running_agent,
    status_is,
)
from tests.integration.module_image import CRASH_MESSAGE, CRASH_SCRIPT
from tests.services import REPO_ROOT, MosquittoBroker, free_port

pytestmark = pytest.mark.integration
digits_build = images.digits_build
module_image = images.module_image


def spec(image: str, **kw: Any) -> dict[str, Any]:
    return {"image": image, "ports": [{"container": 5001}], "health": fast_health(), **kw}


class DockerDevice:
    """One device on the shared engine: its own id (container label), keys, config and cloud side."""

    def __init__(self, root: Path, broker: MosquittoBroker, client: Any, image: str) -> None:
        self.root = root
        self.id = f"dock-{uuid.uuid4().hex[:8]}"
        self.client = client
        self.image = image
        self.keys = Keys(root / "keys")
        self.config = agent_config(root, self.id, broker.port, self.keys, runtime="docker")
        self.cloud = CloudSide(broker.port, self.id)
        self.generation = 0
        self.web = f"w{uuid.uuid4().hex[:6]}"  # container names are global to the engine

    def runtime(self) -> DockerRuntime:
        return DockerRuntime(self.client, device_id=self.id, stop_timeout_s=3)

    def publish(self, modules: dict[str, Any], **fields: Any) -> int:
        self.generation += 1
        self.cloud.publish_desired(
            desired_state(self.id, self.generation, modules, key=self.keys.private, **fields)
        )
        return self.generation

    def containers(self) -> dict[str, Any]:
        found = self.client.containers.list(all=True, filters={"label": f"{lb.DEVICE}={self.id}"})
        names = [c.labels[lb.MODULE] for c in found]
        assert len(names) == len(set(names)), f"duplicate containers: {names}"
        return {c.labels[lb.MODULE]: c for c in found}

    def cleanup(self) -> None:
        for container in self.containers().values():
            container.remove(force=True)
        self.cloud.close()


@pytest.fixture
def device(
    tmp_path: Path, mosquitto: MosquittoBroker, docker_client: Any, module_image: str
) -> Iterator[DockerDevice]:
    d = DockerDevice(tmp_path, mosquitto, docker_client, module_image)
    yield d
    d.cleanup()


async def test_apply_update_stop_remove(device: DockerDevice) -> None:
    web = device.web
    async with running_agent(device.config, device.runtime(), device.keys):
        g1 = device.publish({web: spec(device.image, env={"GREETING": "one"})})
        first = await device.cloud.report(status_is("healthy", g1), "gen 1 healthy")
        assert module_running(web)(first) and first.modules[web].image_digest
        assert first.modules[web].execution_provider == "CPUExecutionProvider"
        id1 = device.containers()[web].id

        g2 = device.publish({web: spec(device.image, env={"GREETING": "two"})})
        await device.cloud.report(status_is("healthy", g2), "gen 2 (new env) healthy")
        container = device.containers()[web]
        assert container.id != id1 and "GREETING=two" in container.attrs["Config"]["Env"]

        g3 = device.publish({web: spec(device.image, env={"GREETING": "two"}, desired_status="stopped")})
        stopped = await device.cloud.report(status_is("healthy", g3), "gen 3 (stopped) healthy")
        assert stopped.modules[web].runtime_status == "stopped"
        assert device.containers()[web].status == "exited" and device.containers()[web].id == container.id

        g4 = device.publish({})
        removed = await device.cloud.report(status_is("healthy", g4), "gen 4 (nothing) healthy")
        assert removed.modules == {} and device.containers() == {}


async def test_crash_loop_backs_off(device: DockerDevice) -> None:
    web = device.web
    crashing = spec(device.image, env={"ENTRY_SCRIPT": f"/module/src/{CRASH_SCRIPT}"})
    async with running_agent(device.config, device.runtime(), device.keys):
        device.publish({web: crashing}, rollback="none", health_deadline_s=600)
        report = await device.cloud.report(
            lambda r: (
                r.modules.get(web) is not None
                and r.modules[web].runtime_status == "backoff"
                and r.modules[web].restart_count >= 2
            ),
            "module in back-off after 2 restarts",
        )
        assert report.modules[web].exit_code == 3
        assert len(device.containers()) == 1
        logs = await asyncio.to_thread(device.containers()[web].logs)
        assert CRASH_MESSAGE in logs.decode()


async def test_rollback_to_last_known_good(device: DockerDevice) -> None:
    web = device.web
    async with running_agent(device.config, device.runtime(), device.keys):
        g1 = device.publish({web: spec(device.image)})
        await device.cloud.report(status_is("healthy", g1), "gen 1 healthy")
        broken = spec(device.image, env={"ENTRY_SCRIPT": f"/module/src/{CRASH_SCRIPT}"})
        g2 = device.publish({web: broken}, health_deadline_s=5)
        rolled = await device.cloud.report(status_is("rolled_back"), "rolled back")
        assert (rolled.generation_received, rolled.generation_applied) == (g2, g1)
        assert f"generation {g2} not healthy within 5 s" in (rolled.reason or "")
        await device.cloud.report(
            lambda r: r.deployment_status == "rolled_back" and module_running(web)(r), "gen 1 running again"
        )
        env = device.containers()[web].attrs["Config"]["Env"]
        assert not any(e.startswith("ENTRY_SCRIPT=") for e in env)


async def test_registry_down_during_pull(device: DockerDevice) -> None:
    web = device.web
    absent = f"127.0.0.1:{free_port()}/edge/absent:1"
    async with running_agent(device.config, device.runtime(), device.keys):
        device.publish(
            {web: spec(device.image), "ghost": spec(absent)}, rollback="none", health_deadline_s=600
        )
        report = await device.cloud.report(
            lambda r: (
                module_running(web)(r)
                and r.modules.get("ghost") is not None
                and r.modules["ghost"].runtime_status == "failed"
            ),
            "web running while the pull of ghost failed",
        )
        assert f"pull of {absent} failed" in (report.modules["ghost"].message or "")
        assert (report.modules["ghost"].message or "").count("pull of") == 1, "the prefix once"
        assert set(device.containers()) == {web}


# ---- the agent as a real process, killed with SIGKILL ------------------------------------------


def write_config_file(device: DockerDevice) -> Path:
    c = device.config
    doc = {
        "device_id": c.device_id,
        "broker": {"url": c.broker.url, "reconnect_min_s": 1, "reconnect_max_s": 2},
        "cloud_public_key": str(c.cloud_public_key),
        "state_dir": str(c.state_dir),
        "runtime": "docker",
        "restart": {"base_s": 0.5, "max_s": 2.0},
        "heartbeat_s": 2.0,
    }
    path = device.root / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def agent_processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def spawn_agent(config: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_sigkill_and_restart_no_duplicates(
    device: DockerDevice, agent_processes: list[subprocess.Popen[bytes]]
) -> None:
    web = device.web
    config = write_config_file(device)
    log = device.root / "agent.log"
    agent_processes.append(spawn_agent(config, log))
    g1 = device.publish({web: spec(device.image)})
    await device.cloud.report(status_is("healthy", g1), "gen 1 healthy (subprocess agent)", timeout=120)
    container_id = device.containers()[web].id
    agent_processes[0].send_signal(signal.SIGKILL)
    await asyncio.to_thread(agent_processes[0].wait)
    assert device.containers()[web].status == "running"

    since = device.cloud.mark()
    agent_processes.append(spawn_agent(config, log))
    again = await device.cloud.next_report(
        lambda r: status_is("healthy", g1)(r) and module_running(web)(r),
        "healthy report from the restarted agent",
        since=since,
    )
    assert again.modules[web].restart_count == 0
    containers = device.containers()
    assert list(containers) == [web] and containers[web].id == container_id, log.read_text()[-2000:]
    assert "restoring generation" in log.read_text()
