"""Fleet benchmark: desired states computed, signed and published; reported states ingested.

A real Mosquitto is started on a free loopback port, and each fleet size gets a fresh SQLite
database with that many provisioned devices (cpu and cuda profiles, so two images are chosen).

- **apply (new)**: ``Fleet.apply`` of a deployment selecting every device: resolve targets, build
  and sign one desired state per device, store them, publish them retained with QoS 1 and wait for
  every PUBACK;
- **apply (changed)**: the same deployment with a new image: every device gets generation 2;
- **apply (unchanged)**: the same manifest again: nothing is signed or published;
- **ingest via broker, live**: a separate process (as devices would be) publishes one
  ReportedState per device (QoS 1, retained) while the ingester, subscribed through
  ``$share/cloud/...``, batches them into SQLite; the rate counts from the first publish until
  the last row is written, so it cannot exceed what that one publishing process manages;
- **ingest via broker, queued backlog**: the same reports published while the ingester's
  persistent session is away; the rate counts from its reconnect until the last row is written
  (what the ingester takes in when the broker delivers as fast as it can);
- **ingest store only**: the same reports handed straight to the ingester's batch writer
  (parse, newest per device, one executemany upsert per batch), without the broker.

    python3 -m bench.fleet_publish [--sizes 1000,10000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bench._servers import mosquitto
from bench._table import table
from cloud.fleet.ingest import Ingestor
from cloud.fleet.service import Fleet
from cloud.keys import load_or_create_signing_key
from cloud.store.db import open_database
from cloud.store.devices import Device, DeviceTag
from edgemqtt import topics
from edgemqtt.endpoint import Endpoint
from modules.contract import DeploymentManifest, ModuleStatus, ReportedState, SystemMetrics, utcnow
from modules.profiles import load_profiles

PUBLISH_TARGET_S = {10_000: 2.0}
INGEST_TARGET = 5_000.0
WAIT_S = 120.0


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def manifest(image_tag: str) -> DeploymentManifest:
    return DeploymentManifest.model_validate(
        {
            "name": "bench",
            "target": {"tags": {"fleet": "bench"}},
            "modules": {
                "detector": {
                    "images": {
                        "cpu": f"reg.local/det:{image_tag}-cpu",
                        "cuda": f"reg.local/det:{image_tag}-cuda",
                    },
                    "env": {"THRESHOLD": "0.5"},
                    "ports": [{"container": 5001, "host": 8080}],
                }
            },
        }
    )


def device_ids(n: int) -> list[str]:
    return [f"dev-{i:05d}" for i in range(n)]


def make_fleet(workdir: Path, n: int) -> Fleet:
    db = open_database(f"sqlite:///{workdir / 'edge.db'}")
    ids = device_ids(n)
    with db.transaction() as s:
        s.execute(
            Device.__table__.insert(),  # type: ignore[attr-defined]
            [
                {
                    "id": d,
                    "profile": "cuda" if i % 4 == 0 else "cpu",
                    "password_hash": "-",
                    "created_at": utcnow(),
                }
                for i, d in enumerate(ids)
            ],
        )
        s.execute(
            DeviceTag.__table__.insert(),  # type: ignore[attr-defined]
            [{"device_id": d, "key": "fleet", "value": "bench"} for d in ids],
        )
    return Fleet(db, load_or_create_signing_key(workdir), load_profiles())


def report(device: str) -> bytes:
    return (
        ReportedState(
            device_id=device,
            generation_applied=1,
            generation_received=1,
            deployment_status="healthy",
            modules={
                "detector": ModuleStatus(runtime_status="running", restart_count=0, image="reg.local/det:1")
            },
            system=SystemMetrics(
                cpu_percent=12.5, memory_used_mb=512, memory_total_mb=4096, disk_free_mb=9000
            ),
            agent_version="bench",
        )
        .model_dump_json()
        .encode()
    )


def publish_reports(host: str, port: int, n: int, times: Connection) -> None:
    """Child process: publish one report per device as fast as QoS 1 allows."""
    payloads = [(d, report(d)) for d in device_ids(n)]
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    client.max_inflight_messages_set(1000)
    client.max_queued_messages_set(0)
    client.connect(host, port)
    client.loop_start()
    started = time.time()
    infos = [client.publish(topics.reported(d), p, qos=1, retain=True) for d, p in payloads]
    for info in infos:
        info.wait_for_publish(WAIT_S)
    times.send((started, time.time()))
    client.disconnect()
    client.loop_stop()


@dataclass
class SizeResult:
    devices: int
    apply_new_s: float
    apply_changed_s: float
    apply_unchanged_s: float
    apply_new_cpu_s: float
    apply_changed_cpu_s: float
    apply_unchanged_cpu_s: float
    published_new: int
    published_changed: int
    published_unchanged: int
    ingest_broker_per_s: float
    ingest_backlog_per_s: float
    devices_publish_per_s: float
    ingest_store_per_s: float


def start_devices(endpoint: Endpoint, n: int) -> tuple[multiprocessing.process.BaseProcess, Connection]:
    """Start a process that publishes one report per device; it sends back (started, finished)."""
    ctx = multiprocessing.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=publish_reports, args=(endpoint.host, endpoint.port, n, sender))
    child.start()
    sender.close()
    return child, receiver


def finish_devices(child: multiprocessing.process.BaseProcess, times: Connection) -> tuple[float, float]:
    """Wait for the publishing process; its (started, finished) wall-clock times."""
    if not times.poll(WAIT_S):
        raise SystemExit(f"the device process did not finish publishing within {WAIT_S:.0f} s")
    started, finished = times.recv()
    child.join(WAIT_S)
    return started, finished


async def ingest_live(fleet: Fleet, endpoint: Endpoint, n: int) -> tuple[float, float]:
    """Reports per second ingested while one process of devices publishes (first publish to last row
    written), and the rate that process published at."""
    async with Ingestor(fleet.db, endpoint, flush_interval_s=0.05) as ingest:
        child, times = start_devices(endpoint, n)
        await ingest.wait_received(n, WAIT_S)
        done = time.time()
        started, finished = await asyncio.to_thread(finish_devices, child, times)
    if ingest.stats.written < n:
        raise SystemExit(f"only {ingest.stats.written} of {n} reports ingested within {WAIT_S:.0f} s")
    return n / (done - started), n / (finished - started)


async def ingest_backlog(fleet: Fleet, endpoint: Endpoint, n: int) -> float:
    """Reports per second ingested from a backlog the broker queued for the ingester's session.

    The session is ended afterwards: a persistent session stays in the shared subscription group
    while away, and would take its share of later reports.
    """
    session = f"bench-ingest-{n}"
    async with Ingestor(fleet.db, endpoint, session=session):
        pass
    child, times = start_devices(endpoint, n)
    await asyncio.to_thread(finish_devices, child, times)
    start = time.time()
    async with Ingestor(fleet.db, endpoint, session=session, flush_interval_s=0.05) as ingest:
        await ingest.wait_received(n, WAIT_S)
        done = time.time()
    end_session(endpoint, session)
    if ingest.stats.written < n:
        raise SystemExit(f"only {ingest.stats.written} of {n} queued reports ingested within {WAIT_S:.0f} s")
    return n / (done - start)


def end_session(endpoint: Endpoint, session: str) -> None:
    """Discard a persistent session: connect with its client id and a clean start."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=session, protocol=MQTTProtocolVersion.MQTTv5)
    client.connect(endpoint.host, endpoint.port, clean_start=True)
    client.loop_start()
    client.disconnect()
    client.loop_stop()


def ingest_store_only(fleet: Fleet, endpoint: Endpoint, n: int) -> float:
    ingest = Ingestor(fleet.db, endpoint)
    payloads = [(topics.reported(d), report(d)) for d in device_ids(n)]
    batch = 2_000
    start = time.perf_counter()
    for i in range(0, n, batch):
        for topic, payload in payloads[i : i + batch]:
            ingest.accept(topic, payload)
        ingest.flush()
    elapsed = time.perf_counter() - start
    assert ingest.stats.written == n
    return n / elapsed


def run_size(root: Path, endpoint: Endpoint, n: int) -> SizeResult:
    workdir = root / f"fleet-{n}"
    workdir.mkdir()
    fleet = make_fleet(workdir, n)
    try:
        timings = []
        cpu = []
        results = []
        for tag in ("1", "2", "2"):
            start, start_cpu = time.perf_counter(), time.process_time()
            result = fleet.apply(manifest(tag), endpoint=endpoint)
            timings.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
            if result.publish.pending:
                raise SystemExit(
                    f"{result.publish.pending} desired states not acknowledged: {result.publish.error}"
                )
            results.append(result.publish.published)
        log(
            f"{n} devices: apply {timings[0]:.2f} s, changed {timings[1]:.2f} s, unchanged {timings[2]:.2f} s"
        )
        broker_rate, devices_rate = asyncio.run(ingest_live(fleet, endpoint, n))
        backlog_rate = asyncio.run(ingest_backlog(fleet, endpoint, n))
        store_rate = ingest_store_only(fleet, endpoint, n)
        log(
            f"{n} devices: ingest {broker_rate:,.0f}/s via broker (devices sent {devices_rate:,.0f}/s), "
            f"{store_rate:,.0f}/s store only"
        )
    finally:
        fleet.close()
    return SizeResult(
        devices=n,
        apply_new_s=timings[0],
        apply_changed_s=timings[1],
        apply_unchanged_s=timings[2],
        apply_new_cpu_s=cpu[0],
        apply_changed_cpu_s=cpu[1],
        apply_unchanged_cpu_s=cpu[2],
        published_new=results[0],
        published_changed=results[1],
        published_unchanged=results[2],
        ingest_broker_per_s=broker_rate,
        ingest_backlog_per_s=backlog_rate,
        devices_publish_per_s=devices_rate,
        ingest_store_per_s=store_rate,
    )


def render(results: list[SizeResult]) -> str:
    rows = [("devices", "step", "measured", "CPU (this process)", "target", "met")]
    for r in results:
        target = PUBLISH_TARGET_S.get(r.devices)
        rows += [
            (
                str(r.devices),
                f"apply new: compute+sign+publish {r.published_new}",
                f"{r.apply_new_s:.2f} s",
                f"{r.apply_new_cpu_s:.2f} s",
                f"≤ {target:.0f} s" if target else "-",
                ("yes" if r.apply_new_s <= target else "NO") if target else "-",
            ),
            (
                str(r.devices),
                f"apply changed image: {r.published_changed} republished",
                f"{r.apply_changed_s:.2f} s",
                f"{r.apply_changed_cpu_s:.2f} s",
                f"≤ {target:.0f} s" if target else "-",
                ("yes" if r.apply_changed_s <= target else "NO") if target else "-",
            ),
            (
                str(r.devices),
                f"apply unchanged: {r.published_unchanged} published",
                f"{r.apply_unchanged_s:.2f} s",
                f"{r.apply_unchanged_cpu_s:.2f} s",
                "0 published",
                "yes" if r.published_unchanged == 0 else "NO",
            ),
            (
                str(r.devices),
                f"ingest via broker, live (devices sent {r.devices_publish_per_s:,.0f}/s)",
                f"{r.ingest_broker_per_s:,.0f}/s",
                "-",
                f"≥ {INGEST_TARGET:,.0f}/s",
                "yes" if r.ingest_broker_per_s >= INGEST_TARGET else "NO",
            ),
            (
                str(r.devices),
                "ingest via broker, queued backlog",
                f"{r.ingest_backlog_per_s:,.0f}/s",
                "-",
                f"≥ {INGEST_TARGET:,.0f}/s",
                "yes" if r.ingest_backlog_per_s >= INGEST_TARGET else "NO",
            ),
            (
                str(r.devices),
                "ingest reports, store only",
                f"{r.ingest_store_per_s:,.0f}/s",
                "-",
                f"≥ {INGEST_TARGET:,.0f}/s",
                "yes" if r.ingest_store_per_s >= INGEST_TARGET else "NO",
            ),
        ]
    return table(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.fleet_publish", description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000,10000", help="comma-separated fleet sizes (default 1000,10000)")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = p.parse_args(argv)
    try:
        sizes = [int(s) for s in args.sizes.split(",")]
    except ValueError:
        p.error(f"--sizes {args.sizes!r}: expected numbers like 1000,10000")
    if any(n < 1 for n in sizes):
        p.error("--sizes: every size must be at least 1")
    with tempfile.TemporaryDirectory(prefix="edge-fleet-bench-") as tmp:
        root = Path(tmp)
        with mosquitto(root, "max_queued_messages 0") as broker:
            endpoint = Endpoint.parse(f"mqtt://127.0.0.1:{broker.port}")
            log(
                f"mosquitto on {endpoint.url}; {os.cpu_count()} CPUs, {platform.python_implementation()} "
                f"{platform.python_version()}"
            )
            results = [run_size(root, endpoint, n) for n in sizes]
    if args.json:
        print(json.dumps([asdict(r) for r in results], indent=2))
    else:
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
        python = platform.python_version()
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {load}, Python {python}")
        print(render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
