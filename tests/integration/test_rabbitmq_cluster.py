"""The fleet on a real 3-node RabbitMQ cluster (Debian's 3.10, MQTT plugin: MQTT 3.1.1, no ``$share``,
retained messages kept per node).

Users and topic permissions are what ``edgectl broker rabbitmq`` writes from the device table,
imported with ``rabbitmqctl import_definitions``; devices are provisioned by ``edgectl device add``
with every node's URL. Hostile-device checks run against the cluster as they do against Mosquitto;
then simulated agents (real admission, planner, state and link) spread over the nodes converge
although each node keeps only the retained messages published through it (the cloud publishes
through node 1; the agents announce their generation and the cloud answers), and one node is
SIGKILLed during a rollout: its devices fail over to the other nodes, every device reports the new
generation, and the node comes back and rejoins.

Two cloud workers share reports through one replicated quorum queue read over AMQP (RabbitMQ's
own competing consumers); one dies holding unacknowledged reports, and the other writes them. Two
``edgectl deploy watch`` processes do the same on one PostgreSQL database, one SIGKILLed mid-stream.

Skipped with a loud reason where RabbitMQ cannot start.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from sqlalchemy import select

from agent.config import load_agent_config
from agent.runtime.simulated import SimulationSettings
from cloud import broker as broker_files
from cloud.api.auth import TOKEN_ENV
from cloud.broker_rabbitmq import REPORTS_QUEUE
from cloud.cli import main
from cloud.config import resolve_settings
from cloud.fleet.amqp_reports import AmqpReports
from cloud.fleet.ingest import Ingestor
from cloud.fleet.service import Fleet
from cloud.keys import load_or_create_signing_key
from cloud.store.db import open_database
from cloud.store.fleet import OnlineRecord, ReportedRecord
from edgemqtt import topics
from edgemqtt.endpoint import Endpoint
from harness.simulate import FleetOptions, SimDevice, SimulatedFleet
from modules.contract import DeploymentManifest, ReportedState
from modules.profiles import load_profiles
from tests.integration.test_store_postgres import db_url, postgres  # noqa: F401 (fixtures)
from tests.rabbitmq_cluster import RabbitCluster
from tests.services import REPO_ROOT, free_port, start_or_skip

pytestmark = pytest.mark.integration

DEVICES = 12
WAIT_S = 180.0
ABSENCE_S = 1.5
FAST = SimulationSettings(pull_s=(0.05, 0.2), start_s=(0.0, 0.0), ready_s=(0.1, 0.3))


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RabbitCluster]:
    root = tmp_path_factory.mktemp("rabbitmq")

    def start() -> RabbitCluster:
        c = RabbitCluster(root)
        try:
            c.start()
        except BaseException:
            c.stop()
            raise
        return c

    started = start_or_skip(request.config, "rabbitmq", start)
    yield started
    started.stop()


@dataclass
class Provisioned:
    data_dir: Path
    ids: list[str]
    passwords: dict[str, str]
    cloud: Endpoint


def edgectl(data_dir: Path, *argv: str) -> None:
    code = main(["--data-dir", str(data_dir), *argv])
    assert code == 0, f"edgectl {' '.join(argv)} exited {code}"


@pytest.fixture(scope="module")
def provisioned(cluster: RabbitCluster, tmp_path_factory: pytest.TempPathFactory) -> Provisioned:
    data_dir = tmp_path_factory.mktemp("cloud")
    urls = ",".join(cluster.mqtt_urls)
    ids = [f"rmq-{i:02d}" for i in range(DEVICES)]
    for device in ids:
        edgectl(data_dir, "device", "add", device, "--tag", "fleet=rabbit", "--broker-url", urls)
    definitions = data_dir / "definitions.json"
    edgectl(data_dir, "broker", "rabbitmq", "--out", str(definitions))
    cluster.nodes[0].ctl("import_definitions", str(definitions))
    passwords = {}
    for device in ids:
        config = load_agent_config(data_dir / "devices" / device / "agent.yaml")
        assert [config.broker.url, *config.broker.failover_urls] == cluster.mqtt_urls
        password = config.broker.read_password()
        assert password is not None
        passwords[device] = password
    user, password = broker_files.cloud_credentials(broker_files.BrokerPaths.of(data_dir))
    cloud = Endpoint.parse(cluster.mqtt_urls, username=user, password=password)
    return Provisioned(data_dir, ids, passwords, cloud)


class Client:
    """A plain MQTT 3.1.1 client on one node, recording messages and disconnects."""

    def __init__(self, url: str, user: str, password: str) -> None:
        address = Endpoint.parse(url).addresses[0]
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._answers: queue.Queue[bool | None] = queue.Queue()
        self.dropped = 0
        """Connections the broker ended (paho reconnects by itself afterwards)."""
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=user, protocol=MQTTProtocolVersion.MQTTv311
        )
        self.client.username_pw_set(user, password)
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, bytes(m.payload)))
        connected: queue.Queue[int] = queue.Queue()
        self.client.on_connect = lambda _c, _u, _f, reason, _p: connected.put(reason.value)
        self.client.on_disconnect = self._dropped
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        self.reason = connected.get(timeout=30)

    def _dropped(self, *_args: object) -> None:
        self.dropped += 1
        self._answers.put(None)

    def subscribe(self, topic: str) -> bool | None:
        """Whether the broker granted it (None: it closed the connection instead of answering)."""
        self._answers = queue.Queue()
        self.client.on_subscribe = lambda _c, _u, _m, reasons, _p: self._answers.put(
            not reasons[0].is_failure
        )
        self.client.subscribe(topic, 1)
        return self._answers.get(timeout=30)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1).wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_devices_reach_only_their_own_topics_on_every_node(
    cluster: RabbitCluster, provisioned: Provisioned
) -> None:
    a, b = provisioned.ids[:2]
    nodes = cluster.mqtt_urls
    cloud = Client(nodes[0], provisioned.cloud.username or "", provisioned.cloud.password or "")
    alpha = Client(nodes[1], a, provisioned.passwords[a])
    beta = Client(nodes[2], b, provisioned.passwords[b])
    wrong = Client(nodes[0], a, "not-the-password")
    try:
        assert (cloud.reason, alpha.reason, beta.reason) == (0, 0, 0)
        assert wrong.reason != 0  # refused
        assert cloud.subscribe(topics.ALL_REPORTED)
        assert alpha.subscribe(topics.desired(a))
        cloud.publish(topics.desired(a), b"for alpha")
        assert alpha.messages.get(timeout=30) == (topics.desired(a), b"for alpha")
        alpha.publish(topics.reported(a), b"alpha reports")
        assert cloud.messages.get(timeout=30) == (topics.reported(a), b"alpha reports")

        # Writing another device's topic, or its own desired state, ends the hostile connection.
        for topic in (topics.reported(b), topics.desired(a)):
            hostile = Client(nodes[1], a, provisioned.passwords[a])
            hostile.client.publish(topic, b"forged", qos=1)
            for _ in range(int(10 / 0.1)):
                if hostile.dropped:
                    break
                time.sleep(0.1)
            assert hostile.dropped, f"{a} could publish on {topic}"
            hostile.close()
        # Reading another device's desired state is refused (SUBACK failure or disconnect): nothing arrives.
        hostile = Client(nodes[2], a, provisioned.passwords[a])
        granted = hostile.subscribe(topics.desired(b))
        cloud.publish(topics.desired(b), b"for beta only")
        with pytest.raises(queue.Empty):
            hostile.messages.get(timeout=ABSENCE_S)
        assert granted is not True
        hostile.close()
        assert cloud.messages.empty()  # nothing forged reached the cloud
    finally:
        for c in (cloud, alpha, beta, wrong):
            c.close()


def manifest(image: str) -> DeploymentManifest:
    return DeploymentManifest.model_validate(
        {
            "name": "rabbit",
            "target": {"tags": {"fleet": "rabbit"}},
            "modules": {"digits": {"images": {"cpu": image}}},
        }
    )


def fleet_state(fleet: Fleet) -> tuple[dict[str, tuple[int, str]], dict[str, bool]]:
    with fleet.db.transaction() as s:
        reported = {
            d: (g, status)
            for d, g, status in s.execute(
                select(
                    ReportedRecord.device_id,
                    ReportedRecord.generation_applied,
                    ReportedRecord.deployment_status,
                )
            )
        }
        online = {d: up for d, up in s.execute(select(OnlineRecord.device_id, OnlineRecord.online))}
    return reported, online


async def until_all(fleet: Fleet, ids: list[str], generation: int, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while True:
        reported, online = await asyncio.to_thread(fleet_state, fleet)
        if all(reported.get(d) == (generation, "healthy") and online.get(d) for d in ids):
            return
        late = sorted(d for d in ids if reported.get(d) != (generation, "healthy"))
        assert asyncio.get_running_loop().time() < deadline, f"{what}: not there: {late}"
        await asyncio.sleep(0.2)


async def test_the_fleet_converges_and_survives_a_node_kill_during_a_rollout(
    cluster: RabbitCluster, provisioned: Provisioned
) -> None:
    data_dir, ids = provisioned.data_dir, provisioned.ids
    db = open_database(resolve_settings(data_dir=data_dir).db_url)
    key = load_or_create_signing_key(data_dir)
    fleet = Fleet(db, key, load_profiles())
    devices = [SimDevice(d, "cpu", d, provisioned.passwords[d]) for d in ids]
    options = FleetOptions(
        broker_url=",".join(cluster.mqtt_urls),
        protocol="mqttv311",
        connect_rate=100,
        heartbeat_s=300,
        reconnect_max_s=2,
        subscribe_qos=0,
        settings=FAST,
    )
    sims = SimulatedFleet(devices, key.public_key(), options)
    try:
        first = await asyncio.to_thread(
            fleet.apply, manifest("registry.local/digits:1"), endpoint=provisioned.cloud
        )
        assert first.publish.published == DEVICES  # retained on node 1 only
        async with Ingestor(
            db, provisioned.cloud, shared=False, protocol="mqttv311", subscribe_qos=0, flush_interval_s=0.05
        ) as ingest:
            task = asyncio.create_task(sims.run())
            try:
                await until_all(fleet, ids, 1, "generation 1 on every device")
                # Devices on nodes 2 and 3 did not see node 1's retained messages: the cloud answered them.
                assert ingest.stats.resent >= DEVICES * 2 // 3

                cluster.nodes[1].kill()  # a third of the devices start there
                second = await asyncio.to_thread(
                    fleet.apply, manifest("registry.local/digits:2"), endpoint=provisioned.cloud
                )
                # As the controller does (edgectl serve, deploy watch): what a node's loss cut short
                # stays pending and is published again on the next pass.
                published, passes = second.publish.published, 1
                while published < DEVICES:
                    assert passes < 30, f"still {DEVICES - published} desired states pending"
                    await asyncio.sleep(1.0)
                    report = await asyncio.to_thread(fleet.publish_pending, provisioned.cloud)
                    published, passes = published + report.published, passes + 1
                await until_all(fleet, ids, 2, "generation 2 on every device after the node kill")
                assert sims.snapshot().connected == DEVICES
            finally:
                sims.stop()
                await asyncio.wait_for(task, WAIT_S)
        await asyncio.to_thread(cluster.restart, 1)
        assert await asyncio.to_thread(cluster.running_nodes) == 3
    finally:
        fleet.close()


def test_the_generated_definitions_name_every_device(provisioned: Provisioned) -> None:
    document = json.loads((provisioned.data_dir / "definitions.json").read_text())
    users = {u["name"] for u in document["users"]}
    assert users == {*provisioned.ids, "_cloud"}
    assert all("{username}" in p["write"] for p in document["topic_permissions"] if p["user"] != "_cloud")


def amqp_urls(cluster: RabbitCluster, cloud: Endpoint) -> list[str]:
    return [f"amqp://{cloud.username}:{cloud.password}@127.0.0.1:{n.amqp_port}/" for n in cluster.nodes]


async def test_workers_share_reports_through_a_quorum_queue_and_survive_a_worker_kill(
    cluster: RabbitCluster, provisioned: Provisioned
) -> None:
    db = open_database(resolve_settings(data_dir=provisioned.data_dir).db_url)
    urls = amqp_urls(cluster, provisioned.cloud)
    options = {"shared": False, "protocol": "mqttv311", "subscribe_qos": 0, "subscribe_reports": False}
    rounds = 5
    try:
        async with (
            Ingestor(db, provisioned.cloud, flush_interval_s=3600, **options) as ingest_a,  # type: ignore[arg-type]
            Ingestor(db, provisioned.cloud, flush_interval_s=0.05, **options) as ingest_b,  # type: ignore[arg-type]
        ):
            # Worker A takes its share and never acknowledges (it writes only every hour), then dies.
            worker_a = AmqpReports(ingest_a, urls, ack_interval_s=3600)
            worker_b = AmqpReports(ingest_b, list(reversed(urls)))
            async with worker_a, worker_b:
                await asyncio.wait_for(worker_a.consuming.wait(), WAIT_S)
                await asyncio.wait_for(worker_b.consuming.wait(), WAIT_S)
                publisher = Client(
                    cluster.mqtt_urls[1], provisioned.cloud.username or "", provisioned.cloud.password or ""
                )
                try:
                    for generation in range(1, rounds + 1):
                        for device in provisioned.ids:
                            state = ReportedState(
                                device_id=device,
                                generation_applied=100 + generation,
                                deployment_status="healthy",
                                agent_version="worker-test",
                            )
                            publisher.publish(topics.reported(device), state.model_dump_json().encode())
                finally:
                    publisher.close()
                total = rounds * DEVICES
                deadline = asyncio.get_running_loop().time() + WAIT_S
                while ingest_a.waiting + worker_b.acknowledged < total:
                    assert asyncio.get_running_loop().time() < deadline, "the reports were not consumed"
                    await asyncio.sleep(0.1)
                assert ingest_a.waiting > 0 and worker_b.acknowledged > 0  # both workers got a share
                assert worker_a.acknowledged == 0
                await worker_a.abort()  # dies without acknowledging what it held
                # RabbitMQ redelivers A's share to B; B writes every report.
                while worker_b.acknowledged < total:
                    assert asyncio.get_running_loop().time() < deadline, (
                        f"worker B wrote {worker_b.acknowledged} of {total} reports after A died"
                    )
                    await asyncio.sleep(0.1)
                assert ingest_b.stats.written == total
        with db.transaction() as s:
            newest = dict(
                s.execute(
                    select(ReportedRecord.device_id, ReportedRecord.generation_applied).where(
                        ReportedRecord.device_id.in_(provisioned.ids)
                    )
                ).all()
            )
        assert newest == {d: 100 + rounds for d in provisioned.ids}  # newer-wins, nothing lost
    finally:
        db.dispose()


def queue_state(cluster: RabbitCluster) -> tuple[int, int]:
    """``(consumers, messages)`` of the shared reports queue."""
    for line in cluster.nodes[0].ctl("list_queues", "name", "consumers", "messages").splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == REPORTS_QUEUE:
            return int(parts[1]), int(parts[2])
    return 0, 0


def test_edgectl_watchers_split_reports_and_one_can_be_killed(
    cluster: RabbitCluster,
    provisioned: Provisioned,
    tmp_path: Path,
    db_url: str,  # noqa: F811 (the fixture)
) -> None:
    """Two cloud workers, ``edgectl deploy watch`` and ``edgectl serve``, share the queue and one
    PostgreSQL database; the watcher is SIGKILLed mid-stream and the server writes the rest."""
    amqp = ",".join(f"amqp://127.0.0.1:{n.amqp_port}/" for n in cluster.nodes)
    cli = [sys.executable, "-m", "cloud.cli", "--data-dir", str(provisioned.data_dir), "--db-url", db_url]
    shared = ["--broker-url", ",".join(cluster.mqtt_urls), "--reports-queue", amqp, "--interval", "0.5"]
    commands = [
        [*cli, "deploy", "watch", *shared],
        [*cli, "serve", "--port", str(free_port()), "--no-dashboard", *shared],
    ]
    logs = [tmp_path / f"worker-{i}.log" for i in range(2)]
    env = {**os.environ, TOKEN_ENV: "token-of-the-cluster-test-0123456789"}
    workers = [
        subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO_ROOT, env=env)
        for argv, log in zip(commands, logs, strict=True)
    ]
    try:
        deadline = time.monotonic() + WAIT_S
        while queue_state(cluster)[0] < 2:
            assert all(w.poll() is None for w in workers), [log.read_text()[-2000:] for log in logs]
            assert time.monotonic() < deadline, "the two workers never both consumed the reports queue"
            time.sleep(0.5)
        publisher = Client(
            cluster.mqtt_urls[2], provisioned.cloud.username or "", provisioned.cloud.password or ""
        )
        rounds = 6
        try:
            for generation in range(1, rounds + 1):
                if generation == rounds // 2:
                    workers[0].send_signal(signal.SIGKILL)  # mid-stream: it may hold unacknowledged reports
                    workers[0].wait(30)
                for device in provisioned.ids:
                    state = ReportedState(
                        device_id=device,
                        generation_applied=200 + generation,
                        deployment_status="healthy",
                        agent_version="watch-test",
                    )
                    publisher.publish(topics.reported(device), state.model_dump_json().encode())
        finally:
            publisher.close()
        db = open_database(db_url)
        try:
            while True:
                with db.transaction() as s:
                    newest = dict(
                        s.execute(
                            select(ReportedRecord.device_id, ReportedRecord.generation_applied).where(
                                ReportedRecord.device_id.in_(provisioned.ids)
                            )
                        ).all()
                    )
                if newest == {d: 200 + rounds for d in provisioned.ids}:
                    break
                assert workers[1].poll() is None, logs[1].read_text()[-2000:]
                assert time.monotonic() < deadline, f"reports not all written: {newest}"
                time.sleep(0.2)
        finally:
            db.dispose()
        while queue_state(cluster) != (1, 0):  # the survivor consumes alone; nothing is left over
            assert time.monotonic() < deadline, f"reports queue (consumers, messages): {queue_state(cluster)}"
            time.sleep(0.5)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.terminate()
                worker.wait(30)
