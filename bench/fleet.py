"""Fleet convergence: from publishing a deployment to every device reporting healthy, through the cloud.

For each fleet size a real Mosquitto starts on a free loopback port (anonymous, no persistence),
a fresh SQLite database gets that many devices, and ``edgectl simulate`` runs them as real agents
(own MQTT session each, real admission, planner and reporting; simulated modules) in one or more
worker processes. The cloud side runs here: the ingester (``$share/cloud/edge/+/reported`` and
``edge/+/online`` into SQLite, as ``edgectl deploy watch`` does) and ``Fleet.apply``.

- **converge**: from calling ``Fleet.apply`` (sign and publish one retained desired state per
  device, one wave) until the database holds a ``healthy`` report at generation 1 from every
  device: publish, broker, agent admission and planning, simulated pull and start (``--pull-s``,
  ``--ready-s``), the first health probe, the report, the broker again and the cloud's ingestion;
- **reports/s**: reports the ingester wrote during that window, divided by its length;
- **CPU**: CPU seconds of the broker, of this process (the cloud: apply and ingestion) and of the
  simulator's processes during the window, and the broker's share of one core.

``--real`` adds one real device: ``edge-agent run`` with Docker Engine and the digits module image
the integration tests build (``edgedeploy-test/module-digits:*``, present in the engine, so no
pull), timed from ``Fleet.apply`` to its healthy report in the database, for several rounds (each
round changes the module's environment, so the container is recreated).

    python3 -m bench.fleet [--sizes 100,1000,10000] [--real] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml
from sqlalchemy import func, select

from bench._servers import mosquitto
from cloud.fleet.ingest import Ingestor
from cloud.fleet.service import Fleet
from cloud.keys import load_or_create_signing_key, public_key_path
from cloud.store.db import Database, open_database
from cloud.store.devices import Device
from cloud.store.fleet import OnlineRecord, ReportedRecord
from edgemqtt.endpoint import Endpoint
from harness.simulate import device_ids
from modules.contract import DeploymentManifest
from modules.profiles import load_profiles

TARGET_S = {1_000: 5.0, 10_000: 30.0}
REAL_DEVICE = "bench-real-1"
TEST_IMAGE_REPOSITORY = "edgedeploy-test/module-digits"
IMAGE = "registry.local/digits@sha256:" + "0" * 64
WAIT_S = 600.0

FLEET_BROKER = ("log_type error", "log_dest stderr", "max_queued_messages 100000")
"""Broker settings for thousands of devices: errors only, deep queues for offline bursts."""


@dataclass
class SizeResult:
    """One fleet size."""

    devices: int
    processes: int
    online_s: float
    publish_s: float
    first_s: float
    half_s: float
    converge_s: float
    target_s: float | None
    reports: int
    reports_per_s: float
    broker_cpu_s: float
    cloud_cpu_s: float
    simulator_cpu_s: float

    @property
    def broker_core_pct(self) -> float:
        """The broker's CPU as a share of one core over the window."""
        return 100 * self.broker_cpu_s / self.converge_s if self.converge_s else 0.0


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for p in processes:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


async def _wait(check: Callable[[], int], goal: int, limit_s: float, what: str) -> None:
    deadline = time.monotonic() + limit_s
    while (got := await asyncio.to_thread(check)) < goal:
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up waiting for {what}: {got}/{goal} after {limit_s:g} s")
        await asyncio.sleep(0.05)


async def _follow(count: Callable[[], int], n: int, t0: float) -> dict[int, float]:
    """Seconds since ``t0`` at which ``count`` first reached 1, half of ``n`` and ``n``."""
    goals = sorted({1, (n + 1) // 2, n})
    marks: dict[int, float] = {}
    while len(marks) < len(goals):
        got = await asyncio.to_thread(count)
        now = time.perf_counter() - t0
        marks.update({g: now for g in goals if g <= got and g not in marks})
        if now > WAIT_S:
            raise SystemExit(f"gave up waiting for {n} devices healthy: {got} after {WAIT_S:g} s")
        await asyncio.sleep(0.05)
    return marks


def _count_online(db: Database) -> int:
    with db.transaction() as s:
        return int(s.scalar(select(func.count()).where(OnlineRecord.online.is_(True))) or 0)


def _count_healthy(db: Database, generation: int, devices: list[str] | None = None) -> int:
    query = select(func.count()).where(
        ReportedRecord.deployment_status == "healthy", ReportedRecord.generation_applied == generation
    )
    if devices is not None:
        query = query.where(ReportedRecord.device_id.in_(devices))
    with db.transaction() as s:
        return int(s.scalar(query) or 0)


def _fleet(data: Path, ids: list[str]) -> Fleet:
    db = open_database(f"sqlite:///{data / 'edgedeploy.db'}")
    with db.transaction() as s:
        s.add_all(Device(id=d, profile="cpu", password_hash="unused") for d in ids)
    return Fleet(db, load_or_create_signing_key(data), load_profiles())


def _manifest(
    name: str, target: dict[str, Any], image: str, interval_s: float = 1.0, **module: Any
) -> DeploymentManifest:
    return DeploymentManifest.model_validate(
        {
            "name": name,
            "target": target,
            "modules": {"digits": {"images": {"cpu": image}, "health": {"interval_s": interval_s}, **module}},
            "health_deadline_s": 300,
        }
    )


def measure_size(n: int, args: argparse.Namespace, work: Path) -> SizeResult:
    """Converge a simulated fleet of ``n`` devices once."""
    processes = args.processes or (1 if n <= 1_000 else 2)
    data = work / "data"
    data.mkdir(parents=True)
    ids = device_ids(n)
    fleet = _fleet(data, ids)
    with mosquitto(work, *FLEET_BROKER) as broker:
        port, broker_pid = broker.port, broker.pid
        url = f"mqtt://127.0.0.1:{port}"
        argv = [
            sys.executable, "-m", "cloud.cli", "simulate", "--devices", str(n), "--broker", url,
            "--public-key", str(public_key_path(data)), "--processes", str(processes),
            "--rate", str(args.rate), "--pull-s", args.pull_s, "--ready-s", args.ready_s,
            "--heartbeat", "600", "--quiet", "--log-level", "error", "--data-dir", str(data),
        ]  # fmt: skip
        with (work / "simulator.log").open("wb") as log:
            simulator = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)
        try:
            endpoint = Endpoint.parse(url)
            return asyncio.run(
                _converge(n, processes, fleet, endpoint, broker_pid, simulator.pid, args.health_interval)
            )
        finally:
            simulator.send_signal(signal.SIGINT)
            try:
                simulator.wait(120)
            except subprocess.TimeoutExpired:
                simulator.kill()
            fleet.close()


async def _converge(
    n: int,
    processes: int,
    fleet: Fleet,
    endpoint: Endpoint,
    broker_pid: int,
    simulator_pid: int,
    interval: float,
) -> SizeResult:
    started = time.monotonic()
    async with Ingestor(fleet.db, endpoint) as ingest:
        await _wait(lambda: _count_online(fleet.db), n, WAIT_S, f"{n} devices online")
        online_s = time.monotonic() - started
        await asyncio.sleep(2)  # the devices' first reports (nothing applied yet) settle
        broker, me = [psutil.Process(broker_pid)], [psutil.Process()]
        before = (_cpu(broker), _cpu(me), _cpu(_tree(simulator_pid)), ingest.stats.written)
        t0 = time.perf_counter()
        await asyncio.to_thread(
            fleet.apply, _manifest("bench", {"profile": "cpu"}, IMAGE, interval), endpoint=endpoint
        )
        publish_s = time.perf_counter() - t0
        marks = await _follow(lambda: _count_healthy(fleet.db, 1), n, t0)
        converge_s = marks[n]
        after = (_cpu(broker), _cpu(me), _cpu(_tree(simulator_pid)), ingest.stats.written)
    reports = after[3] - before[3]
    return SizeResult(
        devices=n,
        processes=processes,
        online_s=online_s,
        publish_s=publish_s,
        first_s=marks[1],
        half_s=marks[(n + 1) // 2],
        converge_s=converge_s,
        target_s=TARGET_S.get(n),
        reports=reports,
        reports_per_s=reports / converge_s,
        broker_cpu_s=after[0] - before[0],
        cloud_cpu_s=after[1] - before[1],
        simulator_cpu_s=after[2] - before[2],
    )


def docker_image() -> str | None:
    """The newest digits module image the integration tests built, if Docker Engine has one."""
    try:
        import docker

        client = docker.from_env(timeout=10)
        images = client.images.list(name=TEST_IMAGE_REPOSITORY)
        client.close()
    except Exception:
        return None
    tagged = sorted((i for i in images if i.tags), key=lambda i: i.attrs.get("Created", ""), reverse=True)
    return tagged[0].tags[0] if tagged else None


def measure_real(rounds: int, work: Path) -> dict[str, Any]:
    """Publish → healthy in the database for one real device (edge-agent + Docker Engine)."""
    image = docker_image()
    if image is None:
        return {
            "skipped": f"no {TEST_IMAGE_REPOSITORY} image in Docker Engine (run the agent's Docker tests)"
        }
    data = work / "data"
    data.mkdir(parents=True)
    fleet = _fleet(data, [REAL_DEVICE])
    times: list[float] = []
    try:
        with mosquitto(work, *FLEET_BROKER) as broker:
            port = broker.port
            config = {
                "device_id": REAL_DEVICE,
                "broker": {"url": f"mqtt://127.0.0.1:{port}"},
                "cloud_public_key": str(public_key_path(data)),
                "state_dir": str(work / "agent-state"),
                "runtime": "docker",
            }
            (work / "agent.yaml").write_text(yaml.safe_dump(config))
            with (work / "agent.log").open("wb") as log:
                agent = subprocess.Popen(
                    [sys.executable, "-m", "agent", "run", "--config", str(work / "agent.yaml")],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            try:
                times = asyncio.run(
                    _real_rounds(fleet, Endpoint.parse(f"mqtt://127.0.0.1:{port}"), image, rounds)
                )
            finally:
                agent.terminate()
                agent.wait(30)
    finally:
        fleet.close()
        _remove_containers(REAL_DEVICE)
    return {"image": image, "rounds_s": times, "median_s": statistics.median(times), "max_s": max(times)}


async def _real_rounds(fleet: Fleet, endpoint: Endpoint, image: str, rounds: int) -> list[float]:
    times = []
    async with Ingestor(fleet.db, endpoint) as ingest:
        del ingest
        await _wait(lambda: _count_online(fleet.db), 1, 60, "the real agent online")
        for generation in range(1, rounds + 1):
            manifest = _manifest(
                "bench-real",
                {"device_ids": [REAL_DEVICE]},
                image,
                env={"ROUND": str(generation)},
                ports=[{"container": 5001}],
            )
            t0 = time.perf_counter()
            await asyncio.to_thread(fleet.apply, manifest, endpoint=endpoint)
            await _wait(_healthy_at(fleet.db, generation), 1, 120, "the real device healthy")
            times.append(time.perf_counter() - t0)
    return times


def _healthy_at(db: Database, generation: int) -> Callable[[], int]:
    return lambda: _count_healthy(db, generation, [REAL_DEVICE])


def _remove_containers(device: str) -> None:
    import docker

    client = docker.from_env(timeout=30)
    for c in client.containers.list(all=True, filters={"label": f"io.edgedeploy.device={device}"}):
        c.remove(force=True)
    client.close()


def show(results: list[SizeResult], real: dict[str, Any] | None, args: argparse.Namespace) -> None:
    """The results as a Markdown table, with the machine and settings."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"machine: {platform.processor() or platform.machine()}, {cpus} CPUs, "
        f"Python {platform.python_version()}"
    )
    print(
        f"simulated modules: pull {args.pull_s} s, start to ready {args.ready_s} s; "
        f"health probe every {args.health_interval:g} s"
    )
    print()
    print(
        "| devices | sim processes | all online | publish | first healthy | half | all healthy | target "
        "| reports | reports/s "
        "| broker CPU | cloud CPU | simulator CPU |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        target = (
            "-"
            if r.target_s is None
            else f"≤ {r.target_s:g} s: {'met' if r.converge_s <= r.target_s else 'NOT met'}"
        )
        print(
            f"| {r.devices:,} | {r.processes} | {r.online_s:.1f} s | {r.publish_s:.2f} s "
            f"| {r.first_s:.2f} s | {r.half_s:.2f} s | {r.converge_s:.2f} s "
            f"| {target} | {r.reports:,} | {r.reports_per_s:,.0f} | {r.broker_cpu_s:.1f} s "
            f"({r.broker_core_pct:.0f} % of a core) | {r.cloud_cpu_s:.1f} s | {r.simulator_cpu_s:.1f} s |"
        )
    if real is not None:
        print()
        if "skipped" in real:
            print(f"real Docker device: skipped ({real['skipped']})")
        else:
            rounds = ", ".join(f"{t:.2f}" for t in real["rounds_s"])
            print(
                f"real Docker device ({real['image']}): publish → healthy in the database "
                f"median {real['median_s']:.2f} s, max {real['max_s']:.2f} s (rounds: {rounds} s)"
            )


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table (``--json``: the figures as JSON)."""
    parser = argparse.ArgumentParser(prog="python3 -m bench.fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100,1000,10000", help="fleet sizes (default 100,1000,10000)")
    parser.add_argument(
        "--processes", type=int, default=0, help="simulator processes (default 1, 2 above 1,000)"
    )
    parser.add_argument(
        "--rate", type=int, default=1000, help="simulated connections per second (default 1000)"
    )
    parser.add_argument("--pull-s", default="0.1-0.5", help="simulated pull time (default 0.1-0.5)")
    parser.add_argument("--ready-s", default="0.1-0.5", help="simulated start to ready (default 0.1-0.5)")
    parser.add_argument(
        "--health-interval", type=float, default=5.0, help="module health probe period (default 5 s)"
    )
    parser.add_argument("--real", action="store_true", help="also time one real Docker device")
    parser.add_argument("--rounds", type=int, default=5, help="rounds for the real device (default 5)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = parser.parse_args(argv)
    try:
        sizes = [int(s.replace(",", "").replace("_", "")) for s in args.sizes.split(",") if s]
    except ValueError:
        parser.error(f"--sizes {args.sizes!r}: expected comma-separated device counts")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        for n in sizes:
            print(f"[bench] {n:,} simulated devices ...", file=sys.stderr, flush=True)
            result = measure_size(n, args, Path(tmp) / f"n{n}")
            print(f"[bench] {n:,}: converged in {result.converge_s:.2f} s", file=sys.stderr, flush=True)
            results.append(result)
        real = measure_real(args.rounds, Path(tmp) / "real") if args.real else None
    if args.json:
        print(json.dumps({"sizes": [asdict(r) for r in results], "real": real}, indent=2))
    else:
        show(results, real, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
