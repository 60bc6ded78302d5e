"""Agent benchmark: RSS and idle CPU of ``edge-agent`` with 5 modules, and desired → healthy time.

A real Mosquitto runs on a free loopback port; ``edge-agent run`` runs as its own process (so
psutil measures the agent alone, not the modules); a paho client plays the cloud.

- **modules**: Docker containers of the digits module image the integration tests build
  (``edgedeploy-test/module-digits:*``, FROM the cpu base image) when Docker Engine has it, else
  (or with ``--runtime process``) ``python -m modules.scoring`` processes of the same model;
- **RSS** (and USS, the memory no other process shares): the agent process once its 5 modules
  are healthy, after the idle window;
- **idle CPU**: the agent's user + system CPU time over ``--idle`` seconds (default 30) with the 5
  modules running and healthy, divided by the wall time: percent of one core. The modules use the
  default health check (a probe every 5 s each) and the default 60 s heartbeat;
- **desired → healthy**: from publishing a desired state that adds one module (image present) to
  the first report showing it running, live and ready; ``--rounds`` times (default 5), median and
  worst. The added module probes every 0.2 s (``health.interval_s``) so the figure measures the
  agent, not the probe period; each round removes the module again.

    python3 -m bench.agent [--runtime docker|process] [--idle 30] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
import yaml
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bench._servers import mosquitto
from edgemqtt import topics
from modules.contract import DesiredState, ReportedState, utcnow
from modules.signing import generate_keypair, load_private_key, sign_desired

REPO_ROOT = Path(__file__).resolve().parent.parent
TEST_IMAGE_REPOSITORY = "edgedeploy-test/module-digits"
PROCESS_IMAGE = "localhost/bench/digits:1"
MODULES = 5
TARGET_RSS_MB = 40.0
TARGET_IDLE_CPU = 0.5
TARGET_HEALTHY_S = 3.0
WAIT_S = 180.0


class Cloud:
    """Publishes signed desired states and collects one device's reports."""

    def __init__(self, port: int, device_id: str) -> None:
        self.device_id = device_id
        self.reports: list[tuple[float, ReportedState]] = []
        self.changed = threading.Condition()
        private_pem, self.public_pem = generate_keypair()
        self.key = load_private_key(private_pem)
        self.generation = 0
        ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv311)
        self.client.on_connect = lambda c, *a: c.subscribe(topics.reported(device_id), 1)
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_message = self._message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        ready.wait(30)

    def _message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self.changed:
            self.reports.append((time.perf_counter(), ReportedState.model_validate_json(message.payload)))
            self.changed.notify_all()

    def publish(self, modules: dict[str, Any]) -> tuple[int, float]:
        self.generation += 1
        now = utcnow()
        state = DesiredState(
            device_id=self.device_id,
            generation=self.generation,
            issued_at=now - timedelta(seconds=5),
            expires_at=now + timedelta(hours=1),
            modules=modules,
        )
        payload = sign_desired(state, self.key).model_dump_json().encode()
        started = time.perf_counter()
        self.client.publish(topics.desired(self.device_id), payload, qos=1, retain=True)
        return self.generation, started

    def wait(self, check: Callable[[ReportedState], bool], since: float, what: str) -> float:
        """The arrival time of the first report after ``since`` matching ``check``."""

        def found() -> float | None:
            return next((t for t, r in self.reports if t >= since and check(r)), None)

        with self.changed:
            at = self.changed.wait_for(found, WAIT_S)
        if at is None:
            last = self.reports[-1][1].model_dump(mode="json") if self.reports else None
            raise SystemExit(f"no report {what} within {WAIT_S:g} s; last: {json.dumps(last)[:2000]}")
        return at

    def close(self) -> None:
        self.client.publish(topics.desired(self.device_id), b"", qos=1, retain=True).wait_for_publish(10)
        self.client.loop_stop()
        self.client.disconnect()


def healthy(names: list[str], generation: int) -> Callable[[ReportedState], bool]:
    def check(r: ReportedState) -> bool:
        if r.generation_applied != generation:
            return False
        for name in names:
            m = r.modules.get(name)
            if m is None or m.runtime_status != "running" or not (m.health and m.health.ready):
                return False
        return True

    return check


def without(name: str, generation: int) -> Callable[[ReportedState], bool]:
    return lambda r: r.generation_applied == generation and name not in r.modules


def docker_image() -> str | None:
    """The newest digits module image in Docker Engine, if the engine answers and has one."""
    try:
        import docker

        client = docker.from_env(timeout=10)
        images = client.images.list(name=TEST_IMAGE_REPOSITORY)
    except Exception:
        return None
    tagged = sorted((i for i in images if i.tags), key=lambda i: i.attrs.get("Created", ""), reverse=True)
    return tagged[0].tags[0] if tagged else None


def unpack_process_image(images_dir: Path) -> str:
    """The digits module unpacked where the process runtime looks for ``PROCESS_IMAGE``."""
    from agent.runtime.process import image_dir
    from modules.examples.digits import build_digits_onnx

    build = images_dir.parent / "digits-build"
    build_digits_onnx(build)
    dest = image_dir(images_dir, PROCESS_IMAGE)
    (dest / "models" / "digits" / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(build / "model.onnx", dest / "models" / "digits" / "1" / "model.onnx")
    shutil.copy(build / "module.json", dest / "module.json")
    return PROCESS_IMAGE


def cleanup_docker(device_id: str) -> None:
    import docker

    client = docker.from_env()
    for c in client.containers.list(all=True, filters={"label": f"io.edgedeploy.device={device_id}"}):
        c.remove(force=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="bench-agent-"))
    device_id = f"bench-{uuid.uuid4().hex[:6]}"
    image = None if args.runtime == "process" else docker_image()
    if args.runtime == "docker" and image is None:
        raise SystemExit(
            "no digits module image in Docker Engine: run the agent's Docker integration tests once "
            "(python3 -m pytest tests/integration/test_agent_docker.py) or use --runtime process"
        )
    runtime = "docker" if image is not None else "process"
    images_dir = work / "images"
    if image is None:
        image = unpack_process_image(images_dir)
    names = [f"{device_id}-m{i}" for i in range(1, MODULES + 1)]
    base = {"image": image, "ports": [{"container": 5001}]}
    agent: subprocess.Popen[bytes] | None = None
    with mosquitto(work) as broker:
        port = broker.port
        cloud = Cloud(port, device_id)
        (work / "cloud.pub").write_bytes(cloud.public_pem)
        config = {
            "device_id": device_id,
            "broker": {"url": f"mqtt://127.0.0.1:{port}"},
            "cloud_public_key": str(work / "cloud.pub"),
            "state_dir": str(work / "state"),
            "runtime": runtime,
        }
        (work / "agent.yaml").write_text(yaml.safe_dump(config))
        argv = [sys.executable, "-m", "agent", "run", "--config", str(work / "agent.yaml")]
        if runtime == "process":
            argv += ["--images-dir", str(images_dir)]
        try:
            with (work / "agent.log").open("wb") as log:
                agent = subprocess.Popen(
                    argv,
                    cwd=REPO_ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                )
            proc = psutil.Process(agent.pid)
            five = {name: dict(base) for name in names}
            generation, started = cloud.publish(five)
            cloud.wait(healthy(names, generation), started, f"with {MODULES} healthy modules")
            time.sleep(2.0)  # let the last start-up probes and reports settle
            before = proc.cpu_times()
            t0 = time.perf_counter()
            time.sleep(args.idle)
            after = proc.cpu_times()
            wall = time.perf_counter() - t0
            idle_cpu = 100.0 * ((after.user - before.user) + (after.system - before.system)) / wall
            memory = proc.memory_full_info()
            rss_mb, uss_mb = memory.rss / 2**20, memory.uss / 2**20
            timings = []
            extra = f"{device_id}-x"
            fast = {**base, "health": {"interval_s": 0.2}}
            for _ in range(args.rounds):
                generation, started = cloud.publish({**five, extra: fast})
                arrived = cloud.wait(healthy([extra], generation), started, "with the added module healthy")
                timings.append(arrived - started)
                generation, started = cloud.publish(five)
                cloud.wait(without(extra, generation), started, "without the added module")
            log_tail = (work / "agent.log").read_text(errors="replace")[-1500:]
        finally:
            if agent is not None:
                agent.terminate()
                agent.wait(30)
            if runtime == "docker":
                cleanup_docker(device_id)
            else:
                from agent.runtime.process import ProcessRuntime

                _stop_processes(ProcessRuntime(work / "state", images_dir))
            cloud.close()
    shutil.rmtree(work, ignore_errors=True)
    return {
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "runtime": runtime,
        "image": image,
        "modules": MODULES,
        "rss_mb": round(rss_mb, 1),
        "uss_mb": round(uss_mb, 1),
        "idle_cpu_percent": round(idle_cpu, 3),
        "idle_window_s": round(wall, 1),
        "desired_to_healthy_s": [round(t, 3) for t in timings],
        "desired_to_healthy_median_s": round(statistics.median(timings), 3),
        "desired_to_healthy_max_s": round(max(timings), 3),
        "agent_log_tail": log_tail if args.verbose else None,
    }


def _stop_processes(runtime: Any) -> None:
    import asyncio

    from agent.actions import Remove

    async def remove_all() -> None:
        observed, _ = await runtime.observe()
        for name in observed:
            await runtime.remove(Remove(module=name, reason="benchmark cleanup"))
        await runtime.close()

    asyncio.run(remove_all())


def show(result: dict[str, Any]) -> None:
    print(f"machine: {result['machine']}")
    print(f"runtime: {result['runtime']} ({result['modules']} modules of {result['image']})")
    rows = [
        (
            "agent RSS, 5 modules running",
            f"{result['rss_mb']:.1f} MB",
            f"<= {TARGET_RSS_MB:g} MB",
            result["rss_mb"] <= TARGET_RSS_MB,
        ),
        (
            "agent USS (memory only it uses)",
            f"{result['uss_mb']:.1f} MB",
            "-",
            True,
        ),
        (
            f"agent idle CPU ({result['idle_window_s']:g} s window)",
            f"{result['idle_cpu_percent']:.2f} % of a core",
            f"<= {TARGET_IDLE_CPU:g} %",
            result["idle_cpu_percent"] <= TARGET_IDLE_CPU,
        ),
        (
            "desired -> healthy, median",
            f"{result['desired_to_healthy_median_s']:.2f} s",
            f"<= {TARGET_HEALTHY_S:g} s",
            result["desired_to_healthy_median_s"] <= TARGET_HEALTHY_S,
        ),
        (
            "desired -> healthy, worst",
            f"{result['desired_to_healthy_max_s']:.2f} s",
            f"<= {TARGET_HEALTHY_S:g} s",
            result["desired_to_healthy_max_s"] <= TARGET_HEALTHY_S,
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'figure':<{width}}  {'measured':>18}  {'target':>10}  met")
    for label, value, target, met in rows:
        verdict = "-" if target == "-" else "yes" if met else "NO"
        print(f"{label:<{width}}  {value:>18}  {target:>10}  {verdict}")
    if result.get("agent_log_tail"):
        print("--- agent log (tail)\n" + result["agent_log_tail"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.agent", description=__doc__.split("\n")[0])
    p.add_argument("--runtime", choices=["auto", "docker", "process"], default="auto")
    p.add_argument("--idle", type=float, default=30.0, help="idle window in seconds")
    p.add_argument("--rounds", type=int, default=5, help="desired -> healthy measurements")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--verbose", action="store_true", help="print the end of the agent's log")
    args = p.parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        show(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
