"""Faults, measured: how fast the fleet's status tells the truth again after an agent or broker dies.

One real device (``edge-agent run``, process runtime, the digits scoring module; the fault suite's
rig, tests/integration/fault_rig.py) against a real Mosquitto on a free loopback port, and the
cloud's real ``Ingestor`` into SQLite:

- **SIGKILL → offline**: the agent is SIGKILLed; seconds until the cloud's store says offline
  (target <= keepalive x 1.5 + 2 s: the broker's bound when a device goes silent; a killed
  process's socket is closed by its kernel, so the broker publishes the will at once);
- **convergence after SIGKILL**: an update is published, the agent is SIGKILLed 0-1.5 s later and
  restarted at once; seconds from the restart until the new generation is reported healthy
  (median and worst over ``--kills``);
- **broker outage**: the broker is stopped ``--outage`` seconds while a client scores the module;
  failed requests, and seconds from the broker's return until a report made after it is stored;
- **fleet**: the same broker return with ``--devices`` simulated devices (``edgectl simulate``,
  real agents with simulated modules): seconds until the first, half and all of them have a fresh
  report in the store, judged by the report's own ``reported_at`` (a report queued before the
  outage does not count). Their reconnects are spread by the link's back-off: 1 s doubling, times
  a random 1-1.5, capped at the simulator's ``reconnect_max_s`` (30 s), so after a 20 s outage the
  last devices come back up to ~25 s later; and ``--rate`` new connections per second.

    python3 -m bench.faults [--kills 20] [--devices 1000] [--outage 20] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from cloud.fleet.ingest import Ingestor
from cloud.keys import load_or_create_signing_key, public_key_path
from cloud.store.db import open_database
from cloud.store.devices import Device
from cloud.store.fleet import ReportedRecord
from edgemqtt.endpoint import Endpoint
from harness.simulate import device_ids
from modules.contract import utcnow
from tests.integration.fault_rig import FaultDevice
from tests.integration.module_image import build_digits
from tests.services import MosquittoBroker

WAIT_S = 180.0


def _converged(generation: int, image: str) -> Any:
    def check(r: Any) -> bool:
        web = r.modules.get("web")
        return bool(
            r.generation_applied == generation
            and r.deployment_status == "healthy"
            and web is not None
            and web.image == image
            and web.runtime_status == "running"
        )

    return check


async def _until(check: Any, what: str) -> float:
    start = time.perf_counter()
    while not check():
        if time.perf_counter() - start > WAIT_S:
            raise SystemExit(f"gave up waiting for {what} after {WAIT_S:g} s")
        await asyncio.sleep(0.05)
    return time.perf_counter() - start


async def one_device(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """SIGKILL loop, SIGKILL → offline and the broker outage, on one real device."""
    (work / "broker").mkdir()
    broker = MosquittoBroker(work / "broker")
    broker.start()
    digits = build_digits(work / "digits")
    (work / "device").mkdir()
    device = FaultDevice(work / "device", digits, broker.port, keepalive_s=args.keepalive)
    rng = random.Random(0)
    try:
        async with device.ingestor:
            device.agent.start()
            generation, image = device.publish_update()
            await device.cloud.report(_converged(generation, image), "first generation", WAIT_S)
            converge: list[float] = []
            for kill in range(args.kills):
                generation, image = device.publish_update()
                await asyncio.sleep(rng.uniform(0, 1.5))
                device.agent.kill()
                mark = device.cloud.mark()
                restarted = time.perf_counter()
                device.agent.start()
                await device.cloud.next_report(_converged(generation, image), f"kill {kill}", WAIT_S, mark)
                converge.append(time.perf_counter() - restarted)
                print(f"  kill {kill + 1}/{args.kills}: converged {converge[-1]:.2f} s", file=sys.stderr)

            client = device.score_loop(work / "client", digits.sample)
            await asyncio.sleep(1)
            broker.stop()
            await asyncio.sleep(args.outage)
            back = utcnow()
            broker.start()

            def fresh() -> bool:
                report, online = device.stored()
                return bool(report is not None and report.reported_at >= back and online)

            fresh_s = await _until(fresh, "a fresh report after the broker's return")
            scored = client.finish()

            device.agent.kill()
            offline_s = await _until(lambda: device.stored()[1] is False, "offline after SIGKILL")
    finally:
        await device.cleanup()
        broker.stop()
    return {
        "keepalive_s": args.keepalive,
        "offline_after_kill_s": round(offline_s, 2),
        "offline_target_s": args.keepalive * 1.5 + 2,
        "kills": args.kills,
        "converge_median_s": round(statistics.median(converge), 2),
        "converge_worst_s": round(max(converge), 2),
        "outage_s": args.outage,
        "requests_ok": scored["ok"],
        "requests_failed": scored["failed"],
        "fresh_report_after_return_s": round(fresh_s, 2),
    }


def _start(argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("wb") as log:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log)


async def fleet(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Broker return → a fresh report from every one of ``--devices`` simulated devices."""
    (work / "fleet-broker").mkdir()
    broker = MosquittoBroker(work / "fleet-broker", conf_extra="max_queued_messages 100000\nlog_type error")
    broker.start()
    data = work / "fleet-data"
    data.mkdir()
    load_or_create_signing_key(data)
    ids = device_ids(args.devices)
    db = open_database(f"sqlite:///{data / 'edgedeploy.db'}")
    with db.transaction() as s:
        s.add_all(Device(id=d, profile="cpu", password_hash="unused") for d in ids)
    url = f"mqtt://127.0.0.1:{broker.port}"
    argv = [
        sys.executable, "-m", "cloud.cli", "simulate", "--devices", str(args.devices), "--broker", url,
        "--public-key", str(public_key_path(data)), "--rate", str(args.rate), "--heartbeat", "600",
        "--quiet", "--log-level", "error", "--data-dir", str(data),
    ]  # fmt: skip
    simulator = _start(argv, work / "simulator.log")

    def fresh_count(since: Any) -> int:
        with db.transaction() as s:
            # The device's own time: a report queued before the outage does not count as fresh.
            query = select(func.count()).where(ReportedRecord.reported_at >= since)
            return int(s.scalar(query) or 0)

    try:
        async with Ingestor(db, Endpoint.parse(url), flush_interval_s=0.1):
            start = utcnow()
            await _until(lambda: fresh_count(start) >= args.devices, "every simulated device's first report")
            broker.stop()
            await asyncio.sleep(args.outage)
            back = utcnow()
            broker.start()
            t0 = time.perf_counter()
            marks: dict[str, float] = {}
            goals = {"first": 1, "half": (args.devices + 1) // 2, "all": args.devices}
            while len(marks) < len(goals):
                got = fresh_count(back)
                now = time.perf_counter() - t0
                marks.update({k: round(now, 2) for k, g in goals.items() if got >= g and k not in marks})
                if now > WAIT_S:
                    raise SystemExit(f"only {got}/{args.devices} fresh reports {WAIT_S:g} s after the return")
                await asyncio.sleep(0.05)
    finally:
        simulator.send_signal(signal.SIGINT)
        try:
            simulator.wait(120)
        except subprocess.TimeoutExpired:
            simulator.kill()
        db.dispose()
        broker.stop()
    return {"devices": args.devices, "outage_s": args.outage, **{f"fresh_{k}_s": v for k, v in marks.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="SIGKILLs in the update loop (default 20)")
    parser.add_argument("--devices", type=int, default=1000, help="simulated devices for the fleet part")
    parser.add_argument(
        "--outage", type=float, default=20.0, help="seconds the broker stays down (default 20)"
    )
    parser.add_argument(
        "--keepalive", type=int, default=5, help="the real agent's MQTT keepalive (default 5)"
    )
    parser.add_argument("--rate", type=float, default=500.0, help="simulator connections per second")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-faults-") as tmp:
        work = Path(tmp)
        single = asyncio.run(one_device(args, work))
        many = asyncio.run(fleet(args, work)) if args.devices > 0 else None
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
        "device": single,
        "fleet": many,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    s = single
    print(f"machine: {os.cpu_count()} CPUs, load {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'figure':<52} {'measured':>10} {'target':>10}")
    rows = [
        (f"SIGKILL -> offline in the cloud (keepalive {s['keepalive_s']} s)", s["offline_after_kill_s"],
         f"<= {s['offline_target_s']:g}"),
        (f"convergence after SIGKILL, median of {s['kills']}", s["converge_median_s"], ""),
        (f"convergence after SIGKILL, worst of {s['kills']}", s["converge_worst_s"], ""),
        (f"broker down {s['outage_s']:g} s: failed / ok scoring requests",
         f"{s['requests_failed']}/{s['requests_ok']}", "0 failed"),
        ("broker return -> fresh report stored, 1 device", s["fresh_report_after_return_s"], ""),
    ]  # fmt: skip
    if many is not None:
        for key in ("first", "half", "all"):
            rows.append(
                (f"broker return -> fresh report, {key} of {many['devices']}", many[f"fresh_{key}_s"], "")
            )
    for label, measured, target in rows:
        print(f"{label:<52} {measured!s:>10} {target:>10}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
