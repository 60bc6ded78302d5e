"""Report ingestion with 1, 2 and 4 cloud workers sharing RabbitMQ's quorum queue and one PostgreSQL.

Used by ``python3 -m bench.cluster`` on its 3-node cluster. For each worker count, one round:

1. with no worker running, ``reports`` reports (one per device ``ingest-000001`` …, each marked
   with the round's ``generation_applied``, about 600 bytes with one module and system metrics) are
   published over AMQP to ``amq.topic`` as the MQTT plugin would route ``edge/{d}/reported``, into
   the shared queue ``edge.reports`` (declared as the workers declare it);
2. that many real workers start together: ``edgectl deploy watch --reports-queue <3 nodes>
   --db-url <PostgreSQL>`` processes;
3. the PostgreSQL row count of the round's reports is polled every 0.2 s; the **rate** is the
   reports written between 20 % and 80 % of the round, so process start-up and the tail are not in
   it. The machine's busy share of its CPUs over that window is kept too: on 2 cores the workers,
   RabbitMQ's three nodes and PostgreSQL share them, which is the ceiling of any scaling.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import aio_pika
import psutil
from sqlalchemy import func, select

from cloud.broker_rabbitmq import EXCHANGE, binding_key
from cloud.fleet.amqp_reports import declare_reports_queue
from cloud.store.db import open_database
from cloud.store.fleet import ReportedRecord
from edgemqtt import topics
from modules.contract import ModuleHealth, ModuleStatus, ReportedState, SystemMetrics

WORKER_COUNTS = (1, 2, 4)
WINDOW = (0.2, 0.8)
ROUND_LIMIT_S = 600.0
PUBLISH_BATCH = 500


@dataclass
class IngestRound:
    """One worker count's figures."""

    workers: int
    reports: int
    rate: float
    """Reports written per second between 20 % and 80 % of the round."""
    busy_pct: float
    """How busy the machine's CPUs were over that window (100 = all of them)."""
    total_s: float
    """From starting the workers until the last report was in the database."""


def reports(count: int, generation: int) -> list[tuple[str, bytes]]:
    """``(routing key, body)`` of one healthy report per device, marked with ``generation``."""
    now = datetime.now(timezone.utc)
    module = ModuleStatus(
        runtime_status="running",
        image="registry.local/digits:1",
        execution_provider="CPUExecutionProvider",
        health=ModuleHealth(live=True, ready=True, latency_ms=1.2, checked_at=now),
    )
    system = SystemMetrics(
        cpu_percent=12.5, memory_used_mb=812.0, memory_total_mb=4096.0, disk_free_mb=20480.0
    )
    out = []
    for i in range(1, count + 1):
        device = f"ingest-{i:06d}"
        state = ReportedState(
            device_id=device,
            generation_applied=generation,
            deployment_status="healthy",
            modules={"digits": module},
            system=system,
            agent_version="bench",
            heartbeat_s=90,
            reported_at=now,
        )
        out.append((binding_key(topics.reported(device)), state.model_dump_json().encode()))
    return out


async def fill(amqp_url: str, messages: list[tuple[str, bytes]]) -> None:
    """Publish ``messages`` to the exchange (with publisher confirms) and wait until the queue holds them."""
    connection = await aio_pika.connect(amqp_url)
    try:
        channel = await connection.channel()
        queue = await declare_reports_queue(channel)
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        for start in range(0, len(messages), PUBLISH_BATCH):
            await asyncio.gather(
                *(
                    exchange.publish(aio_pika.Message(body), routing_key=key)
                    for key, body in messages[start : start + PUBLISH_BATCH]
                )
            )
        while True:
            declared = await channel.declare_queue(queue.name, passive=True)
            if (declared.declaration_result.message_count or 0) >= len(messages):
                return
            await asyncio.sleep(0.2)
    finally:
        await connection.close()


def measure_round(
    workers: int,
    count: int,
    generation: int,
    *,
    data_dir: Path,
    db_url: str,
    mqtt_urls: list[str],
    amqp_urls: list[str],
    amqp_fill_url: str,
    log_dir: Path,
) -> IngestRound:
    """Fill the queue with ``count`` reports, start ``workers`` watchers, time their ingestion."""
    asyncio.run(fill(amqp_fill_url, reports(count, generation)))
    argv = [
        sys.executable, "-m", "cloud.cli", "--data-dir", str(data_dir), "--db-url", db_url,
        "deploy", "watch", "--broker-url", ",".join(mqtt_urls), "--reports-queue", ",".join(amqp_urls),
        "--interval", "60",
    ]  # fmt: skip
    db = open_database(db_url)
    processes = []
    try:
        started = time.monotonic()
        for i in range(workers):
            with (log_dir / f"ingest-{workers}-{i}.log").open("wb") as out:
                processes.append(subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT))
        marks: dict[float, tuple[float, int, float]] = {}
        low, high = (int(count * f) for f in WINDOW)
        while True:
            with db.transaction() as s:
                got = int(
                    s.scalar(select(func.count()).where(ReportedRecord.generation_applied == generation)) or 0
                )
            now = time.monotonic()
            for fraction, threshold in ((WINDOW[0], low), (WINDOW[1], high)):
                if got >= threshold and fraction not in marks:
                    marks[fraction] = (now, got, _busy_cpu_s())
            if got >= count:
                break
            for p in processes:
                if p.poll() is not None:
                    raise RuntimeError(f"an ingest worker exited with {p.returncode}; see {log_dir}")
            if now - started > ROUND_LIMIT_S:
                raise RuntimeError(
                    f"{workers} worker(s) wrote {got} of {count} reports in {ROUND_LIMIT_S:g} s"
                )
            time.sleep(0.2)
        total = time.monotonic() - started
    finally:
        for p in processes:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in processes:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        db.dispose()
    (t0, got0, busy0), (t1, got1, busy1) = marks[WINDOW[0]], marks[WINDOW[1]]
    span = max(t1 - t0, 1e-6)
    busy_pct = 100.0 * (busy1 - busy0) / (span * (os.cpu_count() or 1))
    return IngestRound(workers, count, (got1 - got0) / span, busy_pct, total)


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy (not idle, not waiting for I/O) since boot."""
    cpu = psutil.cpu_times()
    return float(sum(cpu) - cpu.idle - getattr(cpu, "iowait", 0.0))
