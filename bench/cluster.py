"""One Mosquitto vs a 3-node RabbitMQ cluster: convergence, node-kill recovery, ingest workers.

Issue 11's figures in one run: convergence on both, recovery after a node kill, the node's rejoin,
and report ingestion with 1, 2 and 4 cloud workers.

Both convergence runs use the same fleet size, the same simulator (``edgectl simulate`` in a
separate process: real agents with a real agent's 135 s keep-alive, simulated modules; devices
connect at ``--connect-rate`` a second before the clock starts) and the same cloud code in this
process (``Fleet.apply`` and the ingester into SQLite):

- **Mosquitto**: one broker on a free loopback port (anonymous), MQTT 5, the ingester on
  ``$share/cloud/...``;
- **RabbitMQ**: three clustered nodes (the test fixture ``tests/rabbitmq_cluster.py``), devices
  provisioned with their own users and topic permissions (``edgectl broker rabbitmq``), device i
  on node i mod 3 first, MQTT 3.1.1 with ``subscribe_qos 0``; the cloud publishes through node 1
  and answers devices that announce an older generation (retained messages are per node there).

- **converge**: from ``Fleet.apply`` (sign and publish one desired state per device) until every
  device's healthy report at generation 1 is in the database;
- **recovery** (cluster only): node 2 is SIGKILLed; the time until every device that was on it
  has reported again (a new session reports afresh) through another node; then node 2 is started
  again and the time until it runs in the cluster is kept;
- **ingest** (``bench/ingest_workers.py``): reports queued in the shared quorum queue, then 1, 2
  and 4 ``edgectl deploy watch --reports-queue`` processes on one PostgreSQL database.

    python3 -m bench.cluster [--devices 1000] [--connect-rate 100] [--workers 1,2,4] [--json]

Targets (issue 11): the cluster converges within 1.5x Mosquitto's time; after a node kill every
device reports again within 30 s; ingest scales at least 1.6x from 1 to 2 workers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote

from sqlalchemy import func, select

from bench._servers import mosquitto
from bench._table import table
from bench.ingest_workers import WORKER_COUNTS, IngestRound, measure_round
from cloud import broker as broker_files
from cloud.broker_rabbitmq import write_definitions
from cloud.config import resolve_settings
from cloud.fleet.ingest import Ingestor
from cloud.fleet.service import Fleet
from cloud.keys import load_or_create_signing_key, public_key_path
from cloud.store.db import Database, open_database
from cloud.store.devices import Device, rabbitmq_password_hashes
from cloud.store.fleet import OnlineRecord, ReportedRecord
from edgemqtt.endpoint import Endpoint
from harness.simulate import device_ids
from harness.simulate_command import provision, save_credentials
from modules.contract import DeploymentManifest
from modules.profiles import load_profiles
from tests.postgres import PostgresServer
from tests.rabbitmq_cluster import RabbitCluster
from tests.services import ServiceUnavailable

WAIT_S = 600.0
RECOVERY_WAIT_S = 120.0
CONVERGE_RATIO = 1.5
RECOVERY_TARGET_S = 30.0
PROGRESS_S = 5.0
CONNECT_RATE = 100.0
"""New MQTT connections per second the simulator opens (``--connect-rate``)."""
KEEPALIVE_S = 135
"""The simulated agents' MQTT keep-alive: a real agent's default."""
SCALING_TARGET = 1.6
MANIFEST = DeploymentManifest.model_validate(
    {
        "name": "bench-cluster",
        "target": {"profile": "cpu"},
        "modules": {"digits": {"images": {"cpu": "registry.local/digits:1"}, "health": {"interval_s": 1.0}}},
        "health_deadline_s": 300,
    }
)


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@dataclass
class Result:
    broker: str
    devices: int
    converge_s: float
    resent: int
    recovery_s: float | None = None
    dead_node_devices: int = 0
    recovered: int = 0
    """Devices of the dead node that reported again (all of them unless recovery timed out)."""
    rejoin_s: float | None = None
    """From restarting the killed node until it runs in the cluster again."""
    nodes_after: int = 0


def _count(db: Database, query: object) -> int:
    with db.transaction() as s:
        return int(s.scalar(query) or 0)  # type: ignore[call-overload]


def _healthy(db: Database) -> int:
    return _count(
        db,
        select(func.count()).where(
            ReportedRecord.deployment_status == "healthy", ReportedRecord.generation_applied == 1
        ),
    )


def _online(db: Database) -> int:
    return _count(db, select(func.count()).where(OnlineRecord.online.is_(True)))


def _reported_since(db: Database, ids: list[str], since: datetime) -> int:
    stamp = since.replace(tzinfo=None) if db.url.startswith("sqlite") else since
    return _count(
        db,
        select(func.count()).where(ReportedRecord.device_id.in_(ids), ReportedRecord.received_at > stamp),
    )


class GaveUp(Exception):
    """A wait ran out; ``got`` of the goal were reached."""

    def __init__(self, what: str, got: int, goal: int, limit_s: float) -> None:
        super().__init__(f"gave up waiting for {what}: {got} of {goal} after {limit_s:g} s")
        self.got = got


async def _until(check: Callable[[], int], goal: int, what: str, limit_s: float = WAIT_S) -> float:
    started = said = time.monotonic()
    while True:
        got = await asyncio.to_thread(check)
        now = time.monotonic()
        if got >= goal:
            return now - started
        if now - started > limit_s:
            raise GaveUp(what, got, goal, limit_s)
        if now - said >= PROGRESS_S:
            log(f"waiting for {what}: {got} of {goal} after {now - started:.0f} s")
            said = now
        await asyncio.sleep(0.1)


def _simulate(
    data: Path, urls: str, n: int, extra: list[str], log_file: Path, rate: float
) -> subprocess.Popen[bytes]:
    argv = [
        sys.executable, "-m", "cloud.cli", "--data-dir", str(data), "simulate", "--devices", str(n),
        "--broker", urls, "--public-key", str(public_key_path(data)), "--rate", f"{rate:g}",
        "--pull-s", "0.1-0.5", "--ready-s", "0.1-0.5", "--heartbeat", "600", "--keepalive", str(KEEPALIVE_S),
        "--quiet", "--log-level", "error", *extra,
    ]  # fmt: skip
    with log_file.open("wb") as out:
        return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=out)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(120)
    except subprocess.TimeoutExpired:
        process.kill()


async def _converge(fleet: Fleet, endpoint: Endpoint, n: int, ingest: Ingestor) -> float:
    try:
        await _until(lambda: _online(fleet.db), n, f"{n} devices online")
    except GaveUp as e:
        raise SystemExit(str(e)) from None
    await asyncio.sleep(2)  # first reports (nothing applied yet) settle
    started = time.monotonic()
    await asyncio.to_thread(fleet.apply, MANIFEST, endpoint=endpoint)
    try:
        await _until(lambda: _healthy(fleet.db), n, f"{n} devices healthy")
    except GaveUp as e:
        raise SystemExit(str(e)) from None
    return time.monotonic() - started


def run_mosquitto(work: Path, n: int, connect_rate: float = CONNECT_RATE) -> Result:
    data = work / "mosquitto-data"
    data.mkdir()
    db = open_database(f"sqlite:///{data / 'edgedeploy.db'}")
    with db.transaction() as s:
        s.add_all(Device(id=d, profile="cpu", password_hash="unused") for d in device_ids(n))
    fleet = Fleet(db, load_or_create_signing_key(data), load_profiles())
    try:
        with mosquitto(work, "log_type error", "log_dest stderr", "max_queued_messages 100000") as broker:
            url = f"mqtt://127.0.0.1:{broker.port}"
            simulator = _simulate(data, url, n, [], work / "simulate-mosquitto.log", connect_rate)
            try:
                endpoint = Endpoint.parse(url)

                async def measure() -> Result:
                    async with Ingestor(db, endpoint) as ingest:
                        converge = await _converge(fleet, endpoint, n, ingest)
                        return Result("mosquitto", n, converge, ingest.stats.resent)

                return asyncio.run(measure())
            finally:
                _stop(simulator)
    finally:
        fleet.close()


def run_cluster(
    work: Path,
    n: int,
    recovery_wait_s: float = RECOVERY_WAIT_S,
    ingest_reports: int = 0,
    worker_counts: tuple[int, ...] = WORKER_COUNTS,
    connect_rate: float = CONNECT_RATE,
) -> tuple[Result, list[IngestRound]]:
    """Converge, kill node 2, time its devices' return, restart it; then the ingest rounds
    (``ingest_reports`` reports per worker count; 0: none)."""
    data = work / "cluster-data"
    data.mkdir()
    settings = resolve_settings(data_dir=data)
    cluster = RabbitCluster(work / "rabbitmq")
    log("starting 3 RabbitMQ nodes")
    try:
        cluster.start()
    except ServiceUnavailable as e:
        cluster.stop()
        raise SystemExit(f"RabbitMQ cluster cannot start: {e.reason}") from None
    try:
        ids = device_ids(n)
        credentials = provision(settings, [(d, "cpu") for d in ids])
        urls = ",".join(cluster.mqtt_urls)
        save_credentials(data / "credentials.json", credentials, urls)
        db = open_database(settings.db_url)
        with db.transaction() as s:
            hashes = rabbitmq_password_hashes(s)
        paths = broker_files.BrokerPaths.of(data)
        definitions, _ = write_definitions(paths, hashes)
        cluster.nodes[0].ctl("import_definitions", str(definitions))
        user, password = broker_files.cloud_credentials(paths)
        endpoint = Endpoint.parse(cluster.mqtt_urls, username=user, password=password)
        fleet = Fleet(db, load_or_create_signing_key(data), load_profiles())
        extra = [
            "--credentials",
            str(data / "credentials.json"),
            "--protocol",
            "mqttv311",
            "--subscribe-qos",
            "0",
        ]
        simulator = _simulate(data, urls, n, extra, work / "simulate-cluster.log", connect_rate)
        dead = [d for i, d in enumerate(ids) if i % 3 == 1]  # device i starts on node i mod 3

        async def measure() -> Result:
            async with Ingestor(db, endpoint, shared=False, protocol="mqttv311", subscribe_qos=0) as ingest:
                converge = await _converge(fleet, endpoint, n, ingest)
                log(f"cluster converged in {converge:.2f} s; killing node 2")
                killed_at = datetime.now(timezone.utc)
                cluster.nodes[1].kill()
                result = Result("rabbitmq 3 nodes", n, converge, ingest.stats.resent, None, len(dead))
                try:
                    result.recovery_s = await _until(
                        lambda: _reported_since(db, dead, killed_at),
                        len(dead),
                        "the dead node's devices",
                        recovery_wait_s,
                    )
                    result.recovered = len(dead)
                except GaveUp as e:
                    log(str(e))
                    result.recovered = e.got
                return result

        try:
            result = asyncio.run(measure())
        finally:
            _stop(simulator)
            fleet.close()
        started = time.monotonic()
        try:
            cluster.restart(1)
        except ServiceUnavailable as e:
            log(f"node 2 did not start again: {e.reason}")
        else:
            result.rejoin_s = time.monotonic() - started
        result.nodes_after = cluster.running_nodes()
        log(f"{result.nodes_after} nodes running")
        rounds = []
        if ingest_reports:
            rounds = run_ingest(work, data, cluster, user, password, ingest_reports, worker_counts)
        return result, rounds
    finally:
        cluster.stop()


def run_ingest(
    work: Path,
    data: Path,
    cluster: RabbitCluster,
    user: str,
    password: str,
    count: int,
    worker_counts: tuple[int, ...],
) -> list[IngestRound]:
    """Ingest rate with each number of ``edgectl deploy watch`` workers on one PostgreSQL."""
    pg_dir = work / "postgresql"
    pg_dir.mkdir()
    pg_dir.chmod(0o755)
    try:
        server = PostgresServer(pg_dir)
        server.start()
    except ServiceUnavailable as e:
        log(f"PostgreSQL cannot start, no ingest figures: {e.reason}")
        return []
    try:
        db_url = server.url()
        open_database(db_url).dispose()  # creates the tables once, before several workers start
        secret = f"{quote(user, safe='')}:{quote(password, safe='')}@"
        amqp = [f"amqp://127.0.0.1:{node.amqp_port}/" for node in cluster.nodes]
        rounds = []
        for generation, workers in enumerate(worker_counts, start=1):
            log(f"ingest: {count} reports queued, {workers} worker(s)")
            done = measure_round(
                workers,
                count,
                generation,
                data_dir=data,
                db_url=db_url,
                mqtt_urls=cluster.mqtt_urls,
                amqp_urls=amqp,
                amqp_fill_url=amqp[0].replace("://", f"://{secret}", 1),
                log_dir=work,
            )
            log(f"ingest: {workers} worker(s): {done.rate:.0f} reports/s, CPUs {done.busy_pct:.0f} % busy")
            rounds.append(done)
        return rounds
    finally:
        server.stop()


def render(results: list[Result]) -> str:
    mosq = next(r for r in results if r.broker == "mosquitto")
    rows = [("broker", "devices", "converge", "answered", "recovery after node kill", "target", "met")]
    for r in results:
        if r is mosq:
            target, met = "-", "-"
        else:
            limit = mosq.converge_s * CONVERGE_RATIO
            target = f"converge ≤ {limit:.1f} s (1.5x), recovery ≤ {RECOVERY_TARGET_S:.0f} s"
            ok = r.converge_s <= limit and r.recovery_s is not None and r.recovery_s <= RECOVERY_TARGET_S
            met = "yes" if ok else "NO"
        recovery = "-"
        if r.recovery_s is not None:
            recovery = f"{r.recovery_s:.2f} s ({r.dead_node_devices} devices)"
        elif r.dead_node_devices:
            recovery = f"not within the wait: {r.recovered} of {r.dead_node_devices} devices reported"
        rows.append((r.broker, str(r.devices), f"{r.converge_s:.2f} s", str(r.resent), recovery, target, met))
    return table(rows)


def render_ingest(rounds: list[IngestRound]) -> str:
    one = next((r for r in rounds if r.workers == 1), None)
    rows = [
        ("workers", "reports", "ingest rate", "vs 1 worker", "CPUs busy", "all written in", "target", "met")
    ]
    for r in rounds:
        ratio = r.rate / one.rate if one is not None and one.rate else None
        target, met = "-", "-"
        if r.workers == 2 and ratio is not None:
            target, met = f"≥ {SCALING_TARGET:g}x 1 worker", "yes" if ratio >= SCALING_TARGET else "NO"
        rows.append(
            (
                str(r.workers),
                f"{r.reports:,}",
                f"{r.rate:,.0f}/s",
                f"{ratio:.2f}x" if ratio is not None else "-",
                f"{r.busy_pct:.0f} %",
                f"{r.total_s:.1f} s",
                target,
                met,
            )
        )
    return table(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.cluster", description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=1000, help="simulated devices (default 1000)")
    p.add_argument(
        "--recovery-wait",
        type=float,
        default=RECOVERY_WAIT_S,
        metavar="S",
        help=f"how long to wait for the dead node's devices (default {RECOVERY_WAIT_S:g})",
    )
    p.add_argument(
        "--connect-rate",
        type=float,
        default=CONNECT_RATE,
        metavar="N",
        help=f"new connections per second of the simulator, both brokers (default {CONNECT_RATE:g})",
    )
    p.add_argument(
        "--ingest-reports",
        type=int,
        default=50_000,
        metavar="N",
        help="reports queued per ingest round (default 50000; 0: no ingest rounds)",
    )
    p.add_argument("--workers", default="1,2,4", metavar="N,...", help="worker counts of the ingest rounds")
    p.add_argument(
        "--work-dir", type=Path, metavar="DIR", help="keep logs and data here (default: a temp dir)"
    )
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = p.parse_args(argv)
    if args.devices < 3:
        p.error("--devices: at least 3 (one per node)")
    try:
        workers = tuple(int(w) for w in args.workers.split(","))
    except ValueError:
        p.error(f"--workers {args.workers!r}: expected numbers such as 1,2,4")
    with contextlib.ExitStack() as stack:
        if args.work_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="edge-cluster-bench-")))
        else:
            work = args.work_dir
            work.mkdir(parents=True, exist_ok=False)
        log(f"{args.devices} devices on one Mosquitto")
        results = [run_mosquitto(work, args.devices, args.connect_rate)]
        log(f"mosquitto: converged in {results[0].converge_s:.2f} s")
        log(f"{args.devices} devices on a 3-node RabbitMQ cluster")
        cluster, rounds = run_cluster(
            work, args.devices, args.recovery_wait, args.ingest_reports, workers, args.connect_rate
        )
        results.append(cluster)
    if args.json:
        print(
            json.dumps(
                {"converge": [asdict(r) for r in results], "ingest": [asdict(r) for r in rounds]}, indent=2
            )
        )
    else:
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
        python = platform.python_version()
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {load}, Python {python}")
        print(render(results))
        if cluster.rejoin_s is not None:
            took = f"{cluster.rejoin_s:.1f} s"
            print(f"\nrejoin: {cluster.nodes_after} nodes running {took} after restarting node 2")
        else:
            print(f"\nrejoin: node 2 did not start again; {cluster.nodes_after} nodes running")
        if rounds:
            print("\ningest through the quorum queue into one PostgreSQL (edgectl deploy watch workers):")
            print(render_ingest(rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
