"""The agent end to end with ProcessRuntime: real Mosquitto, real ``python -m modules.scoring`` modules.

The agent runs in-process (an asyncio task with a real ``Link``), except in the SIGKILL test where
it is a real ``edge-agent run`` subprocess. The cloud side is a paho client. Every wait is for a
report or an answer, with a generous limit; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from agent.actions import Remove
from agent.metrics import MetricsServer
from agent.runtime.process import CODE_ROOT, ProcessRuntime, image_dir, proc_start_ticks
from modules.contract import CommandRequest, DesiredState, ReportedState
from tests.integration import module_image
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
from tests.integration.module_image import CRASH_MESSAGE, CRASH_SCRIPT, DigitsBuild, until, write_module_dir
from tests.services import REPO_ROOT, MosquittoBroker, MosquittoFactory

pytestmark = pytest.mark.integration
digits_build = module_image.digits_build

SLOW_SITE = """\
import os, time

time.sleep(float(os.environ.get("SLOW_START_S", "0")))
"""
"""``sitecustomize`` that holds a module's Python for ``SLOW_START_S`` before it can listen."""

IMAGE = "localhost:5000/edge/digits:1"
IMAGE_B = "localhost:5000/edge/digits:2"
MISSING = "localhost:5000/edge/absent:1"


def web(image: str = IMAGE, **kw: object) -> dict[str, object]:
    return {"image": image, "ports": [{"container": 5001}], "health": fast_health(), **kw}


class Device:
    """One simulated device: folder, id, keys, unpacked module images, cloud side."""

    def __init__(self, root: Path, broker: MosquittoBroker, digits: DigitsBuild) -> None:
        self.root = root
        self.id = f"proc-{uuid.uuid4().hex[:8]}"
        self.broker = broker
        self.keys = Keys(root / "keys")
        self.images = root / "images"
        for ref in (IMAGE, IMAGE_B):
            write_module_dir(image_dir(self.images, ref), digits)
        self.crash_script = image_dir(self.images, IMAGE) / "src" / CRASH_SCRIPT
        self.config = agent_config(root, self.id, broker.port, self.keys, runtime="process")
        self.cloud = CloudSide(broker.port, self.id)
        self.generation = 0

    def runtime(self) -> ProcessRuntime:
        return ProcessRuntime(self.config.state_dir, self.images, stop_timeout_s=5)

    def publish(self, modules: dict[str, object], **fields: Any) -> int:
        self.generation += 1
        state = desired_state(self.id, self.generation, modules, key=self.keys.private, **fields)
        self.cloud.publish_desired(state)
        return self.generation

    def records(self) -> dict[str, dict[str, object]]:
        folder = self.config.state_dir / "modules"
        return {p.parent.name: json.loads(p.read_text()) for p in sorted(folder.glob("*/record.json"))}

    async def cleanup(self) -> None:
        rt = self.runtime()
        observed, _ = await rt.observe()
        for name in observed:
            await rt.remove(Remove(module=name, reason="test cleanup"))
        await rt.close()
        self.cloud.close()


@pytest.fixture
async def device(
    tmp_path: Path, mosquitto: MosquittoBroker, digits_build: DigitsBuild
) -> AsyncIterator[Device]:
    d = Device(tmp_path, mosquitto, digits_build)
    yield d
    await d.cleanup()


def rejected_with(reason: str) -> Callable[[ReportedState], bool]:
    """A report whose last rejection says ``reason`` (an event: the status stays that of what runs)."""
    return lambda r: r.last_rejection is not None and reason in r.last_rejection.reason


def alive(record: dict[str, object]) -> bool:
    pid, start = record.get("pid"), record.get("pid_start")
    return isinstance(pid, int) and start is not None and proc_start_ticks(pid) == start


async def test_apply_update_stop_remove(device: Device) -> None:
    async with running_agent(device.config, device.runtime(), device.keys):
        g1 = device.publish({"web": web(env={"GREETING": "one"})})
        first = await device.cloud.report(status_is("healthy", g1), "gen 1 healthy")
        assert module_running("web")(first)
        assert first.modules["web"].execution_provider == "CPUExecutionProvider"
        pid1 = device.records()["web"]["pid"]

        g2 = device.publish({"web": web(env={"GREETING": "two"})})
        await device.cloud.report(status_is("healthy", g2), "gen 2 (new env) healthy")
        record = device.records()["web"]
        assert record["pid"] != pid1 and record["spec"]["env"] == {"GREETING": "two"}  # type: ignore[index]

        g3 = device.publish({"web": web(env={"GREETING": "two"}, desired_status="stopped")})
        stopped = await device.cloud.report(status_is("healthy", g3), "gen 3 (stopped) healthy")
        assert stopped.modules["web"].runtime_status == "stopped"
        assert not alive(device.records()["web"])

        g4 = device.publish({"api": web(IMAGE_B)})
        removed = await device.cloud.report(status_is("healthy", g4), "gen 4 (web removed) healthy")
        assert set(removed.modules) == {"api"} and set(device.records()) == {"api"}


def slow_web(device: Device, start_s: float) -> dict[str, object]:
    """A module whose process listens only ``start_s`` after it started (a slow import), probed
    every 0.2 s with 2 failures allowed: far less than its start-up."""
    site = device.root / "slow-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SLOW_SITE)
    return web(
        env={"PYTHONPATH": f"{site}{os.pathsep}{CODE_ROOT}", "SLOW_START_S": str(start_s)},
        health=fast_health(interval_s=0.2, timeout_s=0.5, failure_threshold=2),
    )


async def test_slow_start_is_not_restarted_a_hang_is(device: Device) -> None:
    config = device.config.model_copy(update={"health_start_period_s": 600})
    async with running_agent(config, device.runtime(), device.keys):
        g1 = device.publish({"web": slow_web(device, 3.0)})
        first = await device.cloud.report(status_is("healthy", g1), "the slow module healthy")
        assert first.modules["web"].restart_count == 0  # refused probes while starting: not counted
        pid = device.records()["web"]["pid"]
        assert isinstance(pid, int)
        # The module hangs (its whole process group: a no-code module runs a worker per CPU under
        # a supervisor). Live once: now its failed probes count at once.
        os.killpg(pid, signal.SIGSTOP)
        hung = await device.cloud.next_report(
            lambda r: module_running("web")(r) and r.modules["web"].restart_count == 1,
            "the hung module restarted and running again",
        )
        assert hung.modules["web"].runtime_status == "running"
        assert device.records()["web"]["pid"] != pid


async def test_crash_loop_backs_off(device: Device) -> None:
    crashing = web(env={"ENTRY_SCRIPT": str(device.crash_script)}, health=fast_health())
    async with running_agent(device.config, device.runtime(), device.keys):
        device.publish({"web": crashing}, rollback="none", health_deadline_s=600)
        report = await device.cloud.report(
            lambda r: (
                r.modules.get("web") is not None
                and r.modules["web"].runtime_status == "backoff"
                and r.modules["web"].restart_count >= 2
            ),
            "web in back-off after 2 restarts",
        )
        web_status = report.modules["web"]
        assert web_status.exit_code == 3 and "exited with code 3" in (web_status.message or "")
        logs = await asyncio.to_thread((device.config.state_dir / "modules" / "web" / "module.log").read_text)
        assert CRASH_MESSAGE in logs


async def test_rollback_to_last_known_good(device: Device) -> None:
    async with running_agent(device.config, device.runtime(), device.keys):
        g1 = device.publish({"web": web()})
        await device.cloud.report(status_is("healthy", g1), "gen 1 healthy")
        broken = web(env={"ENTRY_SCRIPT": str(device.crash_script)})
        g2 = device.publish({"web": broken}, health_deadline_s=4)
        rolled = await device.cloud.report(status_is("rolled_back"), "rolled back")
        assert rolled.generation_received == g2 and rolled.generation_applied == g1
        assert f"generation {g2} not healthy within 4 s" in (rolled.reason or "")
        back = await device.cloud.report(
            lambda r: r.deployment_status == "rolled_back" and module_running("web")(r), "gen 1 running again"
        )
        assert back.modules["web"].restart_count == 0
        assert "ENTRY_SCRIPT" not in device.records()["web"]["spec"]["env"]  # type: ignore[index]


async def test_rejected_desired_states_change_nothing(device: Device) -> None:
    async with running_agent(device.config, device.runtime(), device.keys):
        g1 = device.publish({"web": web()})
        await device.cloud.report(status_is("healthy", g1), "gen 1 healthy")
        pid = device.records()["web"]["pid"]
        other = Keys(device.root / "other-keys")
        cases: list[tuple[DesiredState | bytes, str]] = [
            (desired_state(device.id, 2, {"web": web(IMAGE_B)}, key=None), "signature: missing"),
            (desired_state(device.id, 2, {"web": web(IMAGE_B)}, key=other.private), "signature: mismatch"),
            (desired_state(device.id, 1, {"web": web(IMAGE_B)}, key=device.keys.private), "not newer"),
            (desired_state("someone-else", 2, {}, key=device.keys.private), "for device 'someone-else'"),
            (desired_state(device.id, 2, {}, key=device.keys.private, ttl_s=-60), "expired at"),
            (b'{"device_id": 7}', "schema: "),
            (b"\xff not json", "not JSON"),
        ]
        for state, reason in cases:
            since = device.cloud.mark()
            device.cloud.publish_desired(state)
            report = await device.cloud.next_report(
                rejected_with(reason), f"rejected with {reason!r}", since=since
            )
            assert report.generation_applied == g1
            assert report.last_rejection is not None
            newer = (report.last_rejection.generation or 0) > g1  # the cloud's wish is not met then
            assert report.deployment_status == ("rejected" if newer else "healthy"), report
        assert device.records()["web"]["pid"] == pid and alive(device.records()["web"])
        assert device.records()["web"]["image"] == IMAGE


async def test_commands_over_mqtt(device: Device) -> None:
    async with running_agent(device.config, device.runtime(), device.keys):
        g1 = device.publish({"web": web()})
        await device.cloud.report(status_is("healthy", g1), "gen 1 healthy")
        pid = device.records()["web"]["pid"]
        device.cloud.send_command(CommandRequest(id="ping-1", command="ping"))
        device.cloud.send_command(CommandRequest(id="logs-1", command="logs", module="web", tail=5))
        device.cloud.send_command(CommandRequest(id="logs-2", command="logs", module="nope"))
        ping = await device.cloud.response("ping-1")
        assert ping.ok and json.loads(ping.output)["generation_applied"] == g1
        logs = await device.cloud.response("logs-1")
        assert logs.ok and 0 < len(logs.output.splitlines()) <= 5
        unknown = await device.cloud.response("logs-2")
        assert not unknown.ok and "not in the desired state" in (unknown.error or "")
        device.cloud.send_command(CommandRequest(id="restart-1", command="restart", module="web"))
        restarted = await device.cloud.response("restart-1")
        assert restarted.ok, restarted.error
        assert device.records()["web"]["pid"] != pid
        await device.cloud.next_report(
            lambda r: module_running("web")(r) and r.modules["web"].restart_count == 1,
            "web running after the restart, which counts as one",
        )


async def test_missing_image_is_reported_and_others_run(device: Device) -> None:
    async with running_agent(device.config, device.runtime(), device.keys):
        device.publish({"web": web(), "ghost": web(MISSING)}, rollback="none", health_deadline_s=600)
        report = await device.cloud.report(
            lambda r: (
                module_running("web")(r)
                and r.modules.get("ghost") is not None
                and r.modules["ghost"].runtime_status == "failed"
            ),
            "web running, ghost failed",
        )
        message = report.modules["ghost"].message or ""
        assert f"pull of {MISSING} failed: the process runtime cannot download" in message
        assert message.count("pull of") == 1, "the prefix once"
        assert report.deployment_status == "applying"


async def test_broker_restart_mid_run(
    tmp_path: Path, mosquitto_factory: MosquittoFactory, digits_build: DigitsBuild
) -> None:
    broker = mosquitto_factory()
    device = Device(tmp_path, broker, digits_build)
    try:
        async with running_agent(device.config, device.runtime(), device.keys) as agent:
            g1 = device.publish({"web": web()})
            await device.cloud.report(status_is("healthy", g1), "gen 1 healthy")
            pid = device.records()["web"]["pid"]
            await asyncio.to_thread(broker.stop)
            passes = agent.metrics.passes

            async def passes_while_down() -> bool:
                return agent.metrics.passes >= passes + 2 and not agent.metrics.connected()

            await until(passes_while_down, "two reconcile passes with the broker down")
            assert alive(device.records()["web"]) and device.records()["web"]["pid"] == pid
            await asyncio.to_thread(broker.start)
            resumed = await device.cloud.next_report(
                lambda r: r.generation_applied == g1 and module_running("web")(r), "reports after the restart"
            )
            assert resumed.deployment_status == "healthy"
            assert device.records()["web"]["pid"] == pid
    finally:
        await device.cleanup()


# ---- the agent as a real process, killed with SIGKILL ------------------------------------------


def write_config_file(device: Device) -> Path:
    c = device.config
    doc = {
        "device_id": c.device_id,
        "broker": {"url": c.broker.url, "reconnect_min_s": 1, "reconnect_max_s": 2},
        "cloud_public_key": str(c.cloud_public_key),
        "state_dir": str(c.state_dir),
        "runtime": "process",
        "images_dir": str(device.images),
        "restart": {"base_s": 0.5, "max_s": 2.0},
        "heartbeat_s": 2.0,
    }
    path = device.root / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def agent_process(device: Device) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def spawn_agent(device: Device, config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "agent",
                "run",
                "--config",
                str(config),
            ],
            cwd=REPO_ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_sigkill_and_restart_keeps_modules(
    device: Device, agent_process: list[subprocess.Popen[bytes]]
) -> None:
    config = write_config_file(device)
    log = device.root / "agent.log"
    agent_process.append(spawn_agent(device, config, log))
    g1 = device.publish({"web": web(), "api": web(IMAGE_B)})
    await device.cloud.report(
        lambda r: status_is("healthy", g1)(r) and module_running("api")(r), "gen 1 healthy (subprocess agent)"
    )
    pids = {name: r["pid"] for name, r in device.records().items()}
    agent_process[0].send_signal(signal.SIGKILL)
    await asyncio.to_thread(agent_process[0].wait)
    assert all(alive(r) for r in device.records().values())

    agent_process.append(spawn_agent(device, config, log))
    started = device.cloud.mark()
    again: ReportedState = await device.cloud.next_report(
        lambda r: status_is("healthy", g1)(r) and module_running("web")(r) and module_running("api")(r),
        "healthy report from the restarted agent",
        since=started,
    )
    assert again.modules["web"].restart_count == 0
    assert {name: r["pid"] for name, r in device.records().items()} == pids, log.read_text()[-2000:]
    assert "restoring generation" in log.read_text()
    status = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "agent", "status", "--config", str(config), "--json"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    )
    shown = json.loads(status.stdout)
    assert (shown["generation_applied"], shown["last_known_good"], shown["status"]) == (g1, g1, "healthy")
    assert set(shown["last_report"]["modules"]) == {"web", "api"}
    checked = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "agent", "check-config", "--config", str(config), "--json"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    )
    assert json.loads(checked.stdout)["device_id"] == device.id


async def test_metrics_endpoint(device: Device) -> None:
    async with (
        running_agent(device.config, device.runtime(), device.keys) as agent,
        MetricsServer(agent.metrics, 0) as server,
    ):
        g1 = device.publish({"web": web()})
        await device.cloud.report(status_is("healthy", g1), "gen 1 healthy")
        device.cloud.publish_desired(b"garbage")
        await device.cloud.report(rejected_with("not JSON"), "the garbage rejected")
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{server.port}/metrics"
            async with session.get(url) as response:
                assert response.status == 200
                text = await response.text()
            async with session.get(f"http://127.0.0.1:{server.port}/other") as missing:
                assert missing.status == 404
    assert 'edge_agent_actions_total{kind="start",result="ok"} 1' in text
    assert 'edge_agent_modules{status="running"} 1' in text
    assert 'edge_agent_desired_rejections_total{code="not_json"} 1' in text
    assert "edge_agent_mqtt_connected 1" in text
    assert "edge_agent_generation_applied 1" in text
