"""Updates over a bad link, measured: Docker Engine's pull against the agent's resumable pull, and
the agent's idle MQTT bytes per day.

The registry (CNCF distribution) runs in a network namespace behind a veth pair shaped with
``tbf`` (rate), nftables (random loss, both directions) and a delaying TCP relay on 127.0.0.1
(``tc netem`` is used instead where the kernel has it), and the link is cut for ``--cut-for``
seconds every ``--cut-every`` seconds while a pull runs. Both pullers live on the host and reach
the registry through the same relay, so they cross the same link: (a) ``docker pull`` (Docker
Engine's own client), (b) the agent's pull (``pull.method: resumable``: ``RegistryPuller`` into a
blob store, then ``docker load``, as ``DockerRuntime`` does it). A failed pull is started again,
as the agent does after a failure. Bytes on the wire are the veth's own counters (what the
registry side sent), time is until the image is in Docker Engine.

Three updates: a model-only update (the previous version, with the same lower layers, is
already on the device: pulled unshaped before the clock starts) whose new model layer is
``--model-mb``; a full pull of an ``--image-mb`` image that shares nothing with what is local;
and the same full pull interrupted once half of it crossed the link (the ``docker pull`` client
killed, so the engine cancels the pull; the agent's pull task cancelled, as an agent restart
does) and started again. The layers are random bytes (incompressible), distinct per puller and
per update, so neither can reuse what the other fetched.

Idle traffic: a real ``edge-agent run`` (process runtime) in its own namespace, applied and idle
with one desired state and no module, talks to a real Mosquitto through the link; the veth's bytes
(both directions) over ``--idle-s`` seconds are extrapolated to a day. Two runs side by side: the
old cadence (a full report every 60 s, 30 s keep-alive: ``report_refresh_s: 60``, ``heartbeat_s: 60``,
``broker.keepalive_s: 30``, which is what agents did before heartbeats) and the defaults (a small
heartbeat every 90 s, the full report hourly, 135 s keep-alive). A window shorter than an hour holds
no hourly refresh, so the defaults' day adds 24 full reports at the old run's bytes per report
(pings included, so it overstates).

    python3 -m bench.links [--rate-kbit 4096] [--delay-ms 100] [--loss 2] [--model-mb 5]
                           [--image-mb 20] [--idle-s 120] [--json]

The issue's literal shape (256 kbit/s, 200 ms, 5 % loss, a 90 MB image) takes hours per run:
``--rate-kbit 256 --delay-ms 200 --loss 5 --image-mb 90``. Needs root (``ip netns``), Docker
Engine, ``docker-registry`` and ``mosquitto``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.actions import Pull
from agent.runtime.blobs import BlobStore
from agent.runtime.docker import DockerRuntime
from agent.runtime.registry_pull import RegistryPuller
from tests.integration.agent_rig import CloudSide, Keys, desired_state
from tests.integration.fault_rig import AgentProcess
from tests.integration.netns import DelayRelay, DeviceLink
from tests.integration.oci_push import Layer, PushedImage, layer, push_image, random_bytes
from tests.services import MosquittoBroker, wait_for_http

MB = 1_000_000
UPDATES = {"model-only": "model-only", "full": "full", "interrupted": "full, interrupted"}
"""``--updates`` names → the rows they measure."""


@dataclass
class PullResult:
    """One measured pull."""

    update: str
    puller: str
    seconds: float
    wire_bytes: int
    new_bytes: int
    attempts: int
    completed: bool

    @property
    def ratio(self) -> float:
        return self.wire_bytes / self.new_bytes if self.new_bytes else 0.0


class Cutter:
    """Cuts the link for ``down_s`` every ``every_s`` seconds (first cut after ``first_s``) until stopped."""

    def __init__(self, link: DeviceLink, every_s: float, down_s: float, first_s: float = 5.0) -> None:
        self.link, self.every_s, self.down_s, self.first_s = link, every_s, down_s, first_s
        self.cuts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        if self._stop.wait(self.first_s):
            return
        while True:
            self.link.cut()
            self.cuts += 1
            stopped = self._stop.wait(self.down_s)
            self.link.restore()
            if stopped or self._stop.wait(max(self.every_s - self.down_s, 0.1)):
                return

    def __enter__(self) -> Cutter:
        if self.every_s > 0 and self.down_s > 0:
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.down_s + 5)
        self.link.restore()


class RegistryBehindLink:
    """``docker-registry`` inside the namespace on ``device_ip``, reached through a relay on 127.0.0.1."""

    def __init__(self, link: DeviceLink, work: Path) -> None:
        binary = shutil.which("docker-registry")
        if binary is None:
            raise SystemExit("docker-registry is not installed (apt-get install docker-registry)")
        self.port = 5000
        storage = work / "storage"
        storage.mkdir(parents=True)
        config = work / "registry.yml"
        config.write_text(
            "version: 0.1\nlog:\n  level: error\nstorage:\n"
            f"  filesystem:\n    rootdirectory: {storage}\n"
            f"http:\n  addr: {link.device_ip}:{self.port}\n"
        )
        self.log = (work / "registry.log").open("wb")
        self.process = subprocess.Popen(
            [*link.prefix(), binary, "serve", str(config)], stdout=self.log, stderr=subprocess.STDOUT
        )
        self.relay = DelayRelay("127.0.0.1", (link.device_ip, self.port))
        self.address = f"127.0.0.1:{self.relay.port}"
        if not wait_for_http(f"http://{self.address}/v2/", 30):
            self.close()
            raise SystemExit(f"the registry in the namespace did not start; see {work / 'registry.log'}")

    def close(self) -> None:
        self.relay.close()
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)
        self.log.close()


def _layers(total_mb: float, parts: tuple[float, ...]) -> list[Layer]:
    return [layer({f"data/part{i}.bin": random_bytes(int(total_mb * MB * p))}) for i, p in enumerate(parts)]


def _docker_pull(ref: str, deadline: float) -> tuple[int, bool]:
    """``docker pull`` until it succeeds or ``deadline`` passes; ``(attempts, completed)``."""
    attempts = 0
    while time.monotonic() < deadline:
        attempts += 1
        left = max(deadline - time.monotonic(), 1)
        try:
            done = subprocess.run(
                ["docker", "pull", ref], capture_output=True, text=True, timeout=left, check=False
            )
        except subprocess.TimeoutExpired:
            return attempts, False
        if done.returncode == 0:
            return attempts, True
        print(f"    docker pull attempt {attempts} failed: {done.stderr.strip()[-200:]}", flush=True)
        time.sleep(2)
    return attempts, False


async def _agent_pull(runtime: DockerRuntime, ref: str, deadline: float) -> tuple[int, bool]:
    """The agent's pull (retried after a failure, as the planner does) until the image is loaded."""
    attempts = 0
    while time.monotonic() < deadline:
        attempts += 1
        await runtime.pull(Pull(module="bench", image=ref, reason="bench"))
        try:
            await asyncio.wait_for(runtime.pulls.wait(ref), max(deadline - time.monotonic(), 1))
        except asyncio.TimeoutError:
            return attempts, False
        _, images = await runtime.observe([ref])
        if images.is_present(ref):
            return attempts, True
        failure = images.failed.get(ref)
        print(f"    agent pull attempt {attempts} failed: {failure.error if failure else '?'}", flush=True)
        await asyncio.sleep(2)
    return attempts, False


async def _wire_reaches(link: DeviceLink, start: int, target: int, deadline: float) -> None:
    while True:  # polling an interface counter: there is no event to wait on
        if link.host_bytes()[1] - start >= target or time.monotonic() >= deadline:
            return
        await asyncio.sleep(0.2)


async def _interrupted(
    who: str, runtime: DockerRuntime, link: DeviceLink, ref: str, size: int, deadline: float
) -> tuple[int, bool]:
    """Start a pull, stop it once half the image crossed the link (the docker client killed, so the
    engine cancels its pull; the agent's pull task cancelled, as an agent restart does), start again."""
    start = link.host_bytes()[1]
    if who == "docker pull":
        first = await asyncio.create_subprocess_exec(
            "docker", "pull", ref, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        await _wire_reaches(link, start, size // 2, deadline)
        first.kill()
        await first.wait()
        await asyncio.sleep(1)  # the engine notices the client is gone
        attempts, ok = await asyncio.to_thread(_docker_pull, ref, deadline)
        return attempts + 1, ok
    await runtime.pull(Pull(module="bench", image=ref, reason="bench"))
    await _wire_reaches(link, start, size // 2, deadline)
    await runtime.pulls.close()  # what an agent restart does to a pull in flight
    attempts, ok = await _agent_pull(runtime, ref, deadline)
    return attempts + 1, ok


async def measure_pulls(
    args: argparse.Namespace, link: DeviceLink, work: Path
) -> tuple[list[PullResult], str]:
    import docker

    client = docker.from_env()
    registry = RegistryBehindLink(link, work / "registry")
    link.relay = registry.relay
    tag = uuid.uuid4().hex[:8]
    loaded: list[str] = []
    results: list[PullResult] = []
    how = "unshaped"
    try:
        base = _layers(args.base_mb, (0.7, 0.3))
        images: dict[str, dict[str, PushedImage]] = {"model-only": {}, "full": {}, "full, interrupted": {}}
        for who in ("docker pull", "agent"):
            repo = f"bench{tag}/{'docker' if who == 'docker pull' else 'agent'}"
            old = push_image(registry.address, repo, "1", [*base, *_layers(args.model_mb, (1.0,))])
            new = push_image(registry.address, repo, "2", [*base, *_layers(args.model_mb, (1.0,))])
            full = push_image(registry.address, repo + "-full", "1", _layers(args.image_mb, (0.6, 0.3, 0.1)))
            images["model-only"][who] = new
            images["full"][who] = full
            again = push_image(
                registry.address, repo + "-again", "1", _layers(args.image_mb, (0.6, 0.3, 0.1))
            )
            images["full, interrupted"][who] = again
            loaded.append(again.reference)
            images.setdefault("previous", {})[who] = old
            loaded += [old.reference, new.reference, full.reference]
        store = BlobStore(work / "blobs")
        puller = RegistryPuller(store, stall_timeout_s=args.stall_s)
        runtime = DockerRuntime(client, profiles={}, device_id="bench-links", puller=puller)
        # The previous version is on the device before the clock starts (unshaped link).
        assert _docker_pull(images["previous"]["docker pull"].reference, time.monotonic() + 300)[1]
        assert (await _agent_pull(runtime, images["previous"]["agent"].reference, time.monotonic() + 300))[1]
        how = link.shape(args.loss, args.delay_ms, args.rate_kbit)
        for update in [UPDATES[u] for u in args.updates.split(",")]:
            for who in ("docker pull", "agent"):
                pushed = images[update][who]
                new_bytes = (
                    len(pushed.manifest)
                    + len(pushed.config)
                    + sum(len(x.blob) for x in pushed.layers if update == "full" or x not in base)
                )
                print(f"  {update}, {who}: {new_bytes / MB:.1f} MB new ...", flush=True)
                before = link.host_bytes()[1]
                start = time.monotonic()
                deadline = start + args.timeout_s
                with Cutter(link, args.cut_every, args.cut_for):
                    if update == "full, interrupted":
                        attempts, ok = await _interrupted(
                            who, runtime, link, pushed.reference, new_bytes, deadline
                        )
                    elif who == "docker pull":
                        attempts, ok = await asyncio.to_thread(_docker_pull, pushed.reference, deadline)
                    else:
                        attempts, ok = await _agent_pull(runtime, pushed.reference, deadline)
                seconds = time.monotonic() - start
                wire = link.host_bytes()[1] - before
                results.append(PullResult(update, who, round(seconds, 1), wire, new_bytes, attempts, ok))
                print(
                    f"    {seconds:.1f} s, {wire / MB:.2f} MB on the wire, {attempts} attempt(s)", flush=True
                )
        link.unshape()
        await runtime.close()
    finally:
        for ref in loaded:
            with contextlib.suppress(Exception):
                client.images.remove(ref, force=True)
        client.close()
        registry.close()
        link.relay = None
    return results, how


IDLE_RUNS: dict[str, dict[str, Any]] = {
    "old cadence (full report every 60 s, keep-alive 30 s)": {
        "report_refresh_s": 60,
        "heartbeat_s": 60,
        "keepalive_s": 30,
    },
    "defaults (heartbeat 90 s, full report hourly, keep-alive 135 s)": {},
}
"""Label -> settings over the defaults (``keepalive_s`` goes under ``broker``)."""


async def measure_idle(args: argparse.Namespace, work: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """MQTT bytes of an idle agent with ``settings`` over the defaults, over ``--idle-s``, per day."""
    link = DeviceLink()
    (work / "mosquitto").mkdir(parents=True, exist_ok=True)
    broker = MosquittoBroker(work / "mosquitto")
    agent: AgentProcess | None = None
    cloud: CloudSide | None = None
    try:
        broker.start()
        link.relay = DelayRelay(link.host_ip, ("127.0.0.1", broker.port))
        keys = Keys(work / "keys")
        device_id = f"idle-{uuid.uuid4().hex[:8]}"
        broker_settings: dict[str, Any] = {"url": f"mqtt://{link.host_ip}:{link.relay.port}"}
        if "keepalive_s" in settings:
            broker_settings["keepalive_s"] = settings["keepalive_s"]
        config = {
            "device_id": device_id,
            "broker": broker_settings,
            "cloud_public_key": str(keys.public_path),
            "state_dir": str(work / f"idle-state-{device_id}"),
            "runtime": "process",
            **{k: v for k, v in settings.items() if k != "keepalive_s"},
        }
        (work / "idle.yaml").write_text(yaml.safe_dump(config))
        cloud = CloudSide(broker.port, device_id)
        agent = AgentProcess(work / "idle.yaml", work / "idle-agent.log", link.prefix())
        agent.start()
        cloud.publish_desired(desired_state(device_id, 1, {}, key=keys.private))
        await cloud.report(lambda r: r.generation_applied == 1, "generation 1 applied", 60)
        await asyncio.sleep(args.idle_settle_s)
        tx0, rx0 = link.host_bytes()
        reports0, beats0 = len(cloud.reports), len(cloud.heartbeats)
        await asyncio.sleep(args.idle_s)
        tx1, rx1 = link.host_bytes()
        total = (tx1 - tx0) + (rx1 - rx0)
        return {
            "settings": settings,
            "seconds": args.idle_s,
            "bytes_to_device": tx1 - tx0,
            "bytes_from_device": rx1 - rx0,
            "reports": len(cloud.reports) - reports0,
            "heartbeats": len(cloud.heartbeats) - beats0,
            "report_payload_bytes": len(cloud.reports[-1].model_dump_json()),
            "bytes_per_day": round(total * 86400 / args.idle_s),
        }
    finally:
        if agent is not None:
            agent.stop()
        if cloud is not None:
            cloud.close()
        broker.stop()
        link.close()


def _machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{platform.node()} ({os.cpu_count()} CPUs, {platform.machine()}), load average {load}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rate-kbit", type=int, default=4096, help="link rate (default 4096 kbit/s)")
    parser.add_argument("--delay-ms", type=float, default=100, help="round-trip delay added (default 100)")
    parser.add_argument(
        "--loss", type=float, default=2, help="random loss in percent, each direction (default 2)"
    )
    parser.add_argument("--cut-every", type=float, default=30, help="cut the link every N s (0: never)")
    parser.add_argument("--cut-for", type=float, default=10, help="for N s (default 10)")
    parser.add_argument("--model-mb", type=float, default=5, help="new model layer of the model-only update")
    parser.add_argument("--base-mb", type=float, default=10, help="lower layers the device already has")
    parser.add_argument("--image-mb", type=float, default=20, help="size of the full image pull")
    parser.add_argument("--stall-s", type=float, default=30, help="the agent's stall_timeout_s (its default)")
    parser.add_argument("--timeout-s", type=float, default=900, help="give a pull up after N s")
    parser.add_argument("--idle-s", type=float, default=120, help="idle traffic window (0: skip)")
    parser.add_argument("--idle-settle-s", type=float, default=10, help="wait before the idle window")
    parser.add_argument("--skip-pulls", action="store_true", help="only measure idle traffic")
    parser.add_argument(
        "--updates",
        default="model-only,full,interrupted",
        help="which updates to measure, comma-separated (default: model-only,full,interrupted)",
    )
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.updates.split(",")) - set(UPDATES))
    if unknown:
        parser.error(f"--updates: unknown {', '.join(unknown)} (known: {', '.join(UPDATES)})")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        print("bench.links needs root and iproute2 (it creates a network namespace)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="bench-links-") as tmp:
        work = Path(tmp)
        results: list[PullResult] = []
        how = "-"
        if not args.skip_pulls:
            link = DeviceLink()
            try:
                results, how = asyncio.run(measure_pulls(args, link, work))
            finally:
                link.close()
        idle = (
            {label: asyncio.run(measure_idle(args, work, settings)) for label, settings in IDLE_RUNS.items()}
            if args.idle_s > 0
            else None
        )
        if idle is not None:
            old, new = idle.values()
            per_report = (old["bytes_to_device"] + old["bytes_from_device"]) / max(old["reports"], 1)
            new["hourly_refresh_bytes_per_day"] = round(24 * per_report)
            new["bytes_per_day_with_refresh"] = new["bytes_per_day"] + new["hourly_refresh_bytes_per_day"]
    if args.json:
        print(
            json.dumps(
                {"machine": _machine(), "link": how, "pulls": [asdict(r) for r in results], "idle": idle}
            )
        )
        return 0
    print(f"\nmachine: {_machine()}")
    print(
        f"link: {args.rate_kbit} kbit/s, {args.delay_ms:g} ms round trip, {args.loss:g} % loss each way, "
        f"cut {args.cut_for:g} s every {args.cut_every:g} s ({how})\n"
    )
    print("| update | puller | time | bytes on the wire | new bytes | wire / new | attempts | done |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        print(
            f"| {r.update} | {r.puller} | {r.seconds:.1f} s | {r.wire_bytes / MB:.2f} MB | "
            f"{r.new_bytes / MB:.2f} MB | {r.ratio:.2f}x | {r.attempts} | {'yes' if r.completed else 'NO'} |"
        )
    print("target: the agent completes where docker pull restarts layers, with <= 1.1x the new bytes")
    if idle is not None:
        print("\n| idle agent | window | to device | from device | full reports | heartbeats | per day |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for label, run in idle.items():
            refresh = run.get("hourly_refresh_bytes_per_day")
            day = run.get("bytes_per_day_with_refresh", run["bytes_per_day"]) / MB
            print(
                f"| {label} | {run['seconds']:g} s | {run['bytes_to_device']} B | "
                f"{run['bytes_from_device']} B | "
                f"{run['reports']} | {run['heartbeats']} | {day:.2f} MB"
                + (f" (incl. {refresh / MB:.3f} MB of hourly reports)" if refresh is not None else "")
                + " |"
            )
        print(f"full report payload: {run['report_payload_bytes']} B; target: <= 1 MB/day with the defaults")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
