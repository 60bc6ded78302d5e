"""The agent's MQTT link against a real Mosquitto broker, with plain paho as the cloud side.

Nothing here asserts on timing: every wait is for an event, with a generous timeout.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import logging
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.config import AgentConfig, BrokerConfig
from agent.link import Link
from modules.contract import CommandRequest, CommandResponse, OnlineStatus, ReportedState
from tests.services import REPO_ROOT, MosquittoBroker, MosquittoFactory, find_binary, free_port

pytestmark = pytest.mark.integration

WAIT_S = 30.0


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool

    def json(self) -> Any:
        return json.loads(self.payload)


class Cloud:
    """The cloud side: a paho client that records every message it receives.

    ``persistent`` makes an MQTT 3.1.1 session that the broker keeps (and queues QoS 1 messages
    for) while this client or the broker is down.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        persistent: bool = False,
        username: str | None = None,
        password: str | None = None,
    ) -> None:
        self.messages: list[Message] = []
        self._changed = threading.Condition()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"cloud-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv311,
            clean_session=not persistent,
        )
        self.client.reconnect_delay_set(1, 2)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect_async(host, port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            self.messages.append(Message(message.topic, bytes(message.payload), bool(message.retain)))
            self._changed.notify_all()

    async def ready(self) -> None:
        assert await asyncio.to_thread(self._connected.wait, WAIT_S), "the cloud client did not connect"

    async def subscribe(self, topic: str) -> None:
        await self.ready()
        self._subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert await asyncio.to_thread(self._subscribed.wait, WAIT_S), f"no SUBACK for {topic}"

    async def publish(self, topic: str, payload: bytes | str, retain: bool = False) -> None:
        await self.ready()
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        await asyncio.to_thread(info.wait_for_publish, WAIT_S)
        assert info.is_published(), f"publish to {topic} not acknowledged"

    async def wait_for(self, check: Callable[[Message], bool], what: str) -> Message:
        """The first recorded message that passes ``check``, waiting for it if needed."""

        def find() -> Message | None:
            return next((m for m in self.messages if check(m)), None)

        def wait() -> Message | None:
            with self._changed:
                self._changed.wait_for(lambda: find() is not None, WAIT_S)
                return find()

        found = await asyncio.to_thread(wait)
        assert found is not None, f"the cloud never received {what}; got {[m.topic for m in self.messages]}"
        return found

    def on(self, topic: str) -> list[Message]:
        with self._changed:
            return [m for m in self.messages if m.topic == topic]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def until(check: Callable[[], bool], what: str) -> None:
    """Poll ``check`` on the event loop until it holds (failing after a generous timeout)."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"gave up waiting for {what}"
        await asyncio.sleep(0.05)


def config_for(broker: MosquittoBroker, tmp_path: Path, **broker_options: Any) -> AgentConfig:
    """An agent config for a fresh device id on ``broker`` with quick reconnects."""
    options: dict[str, Any] = {"url": f"mqtt://{broker.host}:{broker.port}", "reconnect_max_s": 2}
    options.update(broker_options)
    return AgentConfig(
        device_id=f"dev-{uuid.uuid4().hex[:10]}",
        broker=BrokerConfig(**options),
        cloud_public_key=tmp_path / "cloud.pub",
        state_dir=tmp_path / "state",
    )


def report(device_id: str, generation: int) -> ReportedState:
    return ReportedState(
        device_id=device_id, generation_applied=generation, deployment_status="healthy", agent_version="test"
    )


def messages_logged(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in r.getMessage() for r in caplog.records if r.name.startswith("agent."))


@pytest.fixture
def cloud_for() -> Any:
    clouds: list[Cloud] = []

    def make(broker: MosquittoBroker, **options: Any) -> Cloud:
        cloud = Cloud(broker.host, broker.port, **options)
        clouds.append(cloud)
        return cloud

    yield make
    for cloud in clouds:
        cloud.close()


@pytest.fixture(autouse=True)
def _info_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="agent")


# ---- desired state -----------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["mqttv5", "mqttv311"])
async def test_retained_desired_state_arrives_on_connect_and_online_is_published(
    mosquitto: MosquittoBroker, cloud_for: Any, tmp_path: Path, protocol: str
) -> None:
    config = config_for(mosquitto, tmp_path, protocol=protocol)
    d = config.device_id
    cloud = cloud_for(mosquitto)
    await cloud.subscribe(f"edge/{d}/online")
    desired = json.dumps({"device_id": d, "generation": 3}).encode()
    await cloud.publish(f"edge/{d}/desired", desired, retain=True)

    async with Link(config) as link:
        assert await asyncio.wait_for(link.desired.wait(), WAIT_S) == desired
        online = await cloud.wait_for(lambda m: m.json()["online"] is True, "online: true")
        assert OnlineStatus.model_validate_json(online.payload).online
        assert link.connected
        newer = json.dumps({"device_id": d, "generation": 4}).encode()
        await cloud.publish(f"edge/{d}/desired", newer, retain=True)
        assert await asyncio.wait_for(link.desired.wait(), WAIT_S) == newer

    offline = await cloud.wait_for(lambda m: m.json()["online"] is False, "online: false on clean shutdown")
    assert offline.topic == f"edge/{d}/online" and offline.retain is False


async def test_new_desired_states_replace_the_untaken_one(
    mosquitto: MosquittoBroker, cloud_for: Any, tmp_path: Path
) -> None:
    config = config_for(mosquitto, tmp_path)
    cloud = cloud_for(mosquitto)
    async with Link(config) as link:
        await asyncio.wait_for(link.wait_connected(), WAIT_S)
        await cloud.subscribe(f"edge/{config.device_id}/online")
        await cloud.wait_for(lambda m: m.json()["online"] is True, "online: true")
        for generation in range(1, 6):
            payload = f'{{"generation": {generation}}}'
            await cloud.publish(f"edge/{config.device_id}/desired", payload, retain=True)
        await until(lambda: link.desired.take() == b'{"generation": 5}', "the newest desired state")
        assert link.desired.take() is None
        assert not link.desired.ready.is_set()


async def test_resubscribes_after_broker_restart(
    mosquitto_factory: MosquittoFactory, cloud_for: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = mosquitto_factory()
    config = config_for(broker, tmp_path)
    topic = f"edge/{config.device_id}/desired"
    cloud = cloud_for(broker)
    await cloud.publish(topic, b'{"generation": 1}', retain=True)

    async with Link(config) as link:
        assert await asyncio.wait_for(link.desired.wait(), WAIT_S) == b'{"generation": 1}'
        await asyncio.to_thread(broker.restart)
        await until(lambda: messages_logged(caplog, "resubscribed to") >= 1, "the link to reconnect")
        await cloud.publish(topic, b'{"generation": 2}', retain=True)
        while (payload := await asyncio.wait_for(link.desired.wait(), WAIT_S)) != b'{"generation": 2}':
            assert payload == b'{"generation": 1}'  # the retained one again, on resubscribing
    assert messages_logged(caplog, "disconnected from") >= 1


# ---- last will and online status --------------------------------------------------------------

HOLDER = """
import asyncio, sys
from agent.config import AgentConfig
from agent.link import Link

async def main():
    async with Link(AgentConfig.model_validate_json(sys.argv[1])) as link:
        await link.wait_connected()
        print("connected", flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_last_will_is_published_when_the_agent_dies(
    mosquitto: MosquittoBroker, cloud_for: Any, tmp_path: Path
) -> None:
    config = config_for(mosquitto, tmp_path)
    topic = f"edge/{config.device_id}/online"
    cloud = cloud_for(mosquitto)
    await cloud.subscribe(topic)
    agent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, config.model_dump_json(), cwd=REPO_ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert agent.stdout is not None
        line = await asyncio.wait_for(agent.stdout.readline(), WAIT_S)
        assert line.strip() == b"connected", f"the agent process said {line!r} (exit {agent.returncode})"
        await cloud.wait_for(lambda m: m.json()["online"] is True, "online: true from the agent")
        agent.kill()  # SIGKILL: no clean disconnect, the broker must publish the will
        await agent.wait()
    finally:
        if agent.returncode is None:
            agent.kill()
            await agent.wait()
    will = await cloud.wait_for(lambda m: m.json()["online"] is False, "the last will (online: false)")
    birth = next(m for m in cloud.on(topic) if m.json()["online"] is True)
    # The will was armed before the birth (its ts is older) but belongs to the same session, so
    # the cloud orders it after the birth.
    assert will.json()["session"] == birth.json()["session"] is not None
    assert will.json()["instance"] == birth.json()["instance"]

    late = cloud_for(mosquitto)
    await late.subscribe(topic)
    retained = await late.wait_for(lambda m: m.topic == topic, "the retained online status")
    assert retained.retain and retained.json()["online"] is False

    # The restarted agent continues above the killed one's session, even with its clock set back.
    (config.state_dir / "mqtt-session").write_text(f"{birth.json()['session'] + 10**12}\n")
    async with Link(config) as link:
        await asyncio.wait_for(link.wait_connected(), WAIT_S)
        again = await late.wait_for(lambda m: m.json()["online"] is True, "online: true after the restart")
    assert again.json()["session"] == birth.json()["session"] + 10**12 + 1
    assert again.json()["instance"] != birth.json()["instance"]


async def test_two_agents_with_one_device_id_are_detected(
    mosquitto: MosquittoBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    first = config_for(mosquitto, tmp_path / "a")
    second = first.model_copy(update={"state_dir": tmp_path / "b"})
    async with Link(first) as a:
        await asyncio.wait_for(a.wait_connected(), WAIT_S)
        async with Link(second) as b:
            await asyncio.wait_for(b.wait_connected(), WAIT_S)
            await until(
                lambda: a.client_conflict is not None, "the first agent to see its session taken over"
            )
            assert a.client_conflict is not None and a.client_conflict.takeovers == 1
            assert first.device_id in a.client_conflict.detail
            await asyncio.sleep(2 * first.broker.reconnect_max_s)
            assert b.connected and not a.connected  # the first waits instead of knocking b off
    assert messages_logged(caplog, "took this session over") >= 1


# ---- reports ----------------------------------------------------------------------------------


async def test_reports_sent_while_broker_is_down_arrive_after_it_returns_latest_only(
    mosquitto_factory: MosquittoFactory, cloud_for: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = mosquitto_factory()
    config = config_for(broker, tmp_path)
    d = config.device_id
    topic = f"edge/{d}/reported"
    # A persistent session: the broker keeps the subscription over its restart and queues for it
    # every report published while this client is not reconnected yet, so it sees all of them.
    cloud = cloud_for(broker, persistent=True)
    await cloud.subscribe(topic)

    def generations() -> list[int]:
        return [m.json()["generation_applied"] for m in cloud.on(topic)]

    async with Link(config) as link:
        await asyncio.wait_for(link.wait_connected(), WAIT_S)
        await link.publish_reported(report(d, 0))
        await asyncio.wait_for(link.flush_reported(), WAIT_S)
        await cloud.wait_for(lambda m: m.topic == topic, "the first report")

        await asyncio.to_thread(broker.stop)
        await until(lambda: not link.connected, "the link to notice the broker is gone")
        for generation in range(1, 11):
            await link.publish_reported(report(d, generation))
        await asyncio.to_thread(broker.start)
        await asyncio.wait_for(link.flush_reported(), WAIT_S)
        await cloud.wait_for(lambda m: m.topic == topic and m.json()["generation_applied"] == 10, "report 10")

    assert generations() == [0, 10]
    assert messages_logged(caplog, "flushed after") == 1
    assert messages_logged(caplog, "9 older unsent report(s) dropped") == 1
    late = cloud_for(broker)
    await late.subscribe(topic)
    retained = await late.wait_for(lambda m: m.topic == topic, "the retained report")
    assert retained.retain and retained.json()["generation_applied"] == 10


async def test_broker_down_at_start_then_up(
    mosquitto_factory: MosquittoFactory, cloud_for: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = mosquitto_factory()
    await asyncio.to_thread(broker.stop)
    config = config_for(broker, tmp_path)
    d = config.device_id

    async with Link(config) as link:
        await until(lambda: messages_logged(caplog, "cannot connect to") >= 2, "failed attempts to be logged")
        assert not link.connected
        assert messages_logged(caplog, "ConnectionRefusedError") >= 1
        await link.publish_reported(report(d, 7))
        await asyncio.to_thread(broker.start)
        await asyncio.wait_for(link.wait_connected(), WAIT_S)
        await asyncio.wait_for(link.flush_reported(), WAIT_S)
        cloud = cloud_for(broker)
        await cloud.subscribe(f"edge/{d}/#")
        await cloud.wait_for(lambda m: m.topic.endswith("/online") and m.json()["online"], "online: true")
        got = await cloud.wait_for(lambda m: m.topic.endswith("/reported"), "the report queued while down")
        assert got.retain and got.json()["generation_applied"] == 7


async def test_report_for_another_device_is_refused(mosquitto: MosquittoBroker, tmp_path: Path) -> None:
    async with Link(config_for(mosquitto, tmp_path)) as link:
        with pytest.raises(ValueError, match="report for device 'someone-else'"):
            await link.publish_reported(report("someone-else", 1))


# ---- commands ---------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["mqttv5", "mqttv311"])
async def test_command_round_trip(
    mosquitto: MosquittoBroker, cloud_for: Any, tmp_path: Path, protocol: str
) -> None:
    config = config_for(mosquitto, tmp_path, protocol=protocol)
    d = config.device_id
    cloud = cloud_for(mosquitto)
    await cloud.subscribe(f"edge/{d}/cmd/res/+")
    async with Link(config) as link:
        await asyncio.wait_for(link.wait_connected(), WAIT_S)
        request = CommandRequest(id="c-1", command="logs", module="web", tail=5)
        await cloud.publish(f"edge/{d}/cmd/req/c-1", request.model_dump_json())
        received = await asyncio.wait_for(anext(link.commands()), WAIT_S)
        assert received == request
        await link.respond(CommandResponse(id="c-1", ok=True, output="line 1\nline 2"))
        answer = await cloud.wait_for(lambda m: m.topic == f"edge/{d}/cmd/res/c-1", "the response")
    assert not answer.retain
    assert CommandResponse.model_validate_json(answer.payload) == CommandResponse(
        id="c-1", ok=True, output="line 1\nline 2"
    )


async def test_malformed_commands_get_error_responses(
    mosquitto: MosquittoBroker, cloud_for: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = config_for(mosquitto, tmp_path)
    d = config.device_id
    cloud = cloud_for(mosquitto)
    await cloud.subscribe(f"edge/{d}/cmd/res/+")

    async def error_for(command_id: str, payload: str) -> str:
        await cloud.publish(f"edge/{d}/cmd/req/{command_id}", payload)
        topic = f"edge/{d}/cmd/res/{command_id}"
        answer = await cloud.wait_for(lambda m: m.topic == topic, f"a response to {command_id}")
        response = CommandResponse.model_validate_json(answer.payload)
        assert (response.id, response.ok) == (command_id, False)
        assert response.error is not None
        return response.error

    async with Link(config) as link:
        await asyncio.wait_for(link.wait_connected(), WAIT_S)
        assert "malformed command: (document): Invalid JSON" in await error_for("bad-1", "not json")
        assert "command: Input should be 'logs', 'restart' or 'ping'" in await error_for(
            "bad-2", '{"id": "bad-2", "command": "reboot"}'
        )
        restart = '{"id": "bad-3", "command": "restart"}'
        assert "command 'restart' needs a module" in await error_for("bad-3", restart)
        assert "payload's id 'other' does not match the topic's 'bad-4'" in await error_for(
            "bad-4", '{"id": "other", "command": "ping"}'
        )
        await cloud.publish(f"edge/{d}/cmd/req/bad.5", "not json")
        await until(lambda: messages_logged(caplog, "unusable id") == 1, "the unanswerable command's log")
        await cloud.publish(f"edge/{d}/cmd/req/ok-6", '{"id": "ok-6", "command": "ping"}')
        assert (await asyncio.wait_for(anext(link.commands()), WAIT_S)).id == "ok-6"
    assert not any(m.topic.endswith("/bad.5") for m in cloud.messages)


# ---- authentication and TLS -------------------------------------------------------------------


def password_file(tmp_path: Path, users: dict[str, str]) -> Path:
    binary = find_binary("mosquitto_passwd")
    if binary is None:
        pytest.skip("REAL PART UNAVAILABLE: mosquitto_passwd not installed: apt-get install mosquitto")
    path = tmp_path / "passwd"
    for i, (user, password) in enumerate(users.items()):
        flags = ["-b", "-c"] if i == 0 else ["-b"]
        subprocess.run([binary, *flags, str(path), user, password], check=True, capture_output=True)
    return path


async def test_username_password_auth(
    mosquitto_factory: MosquittoFactory, cloud_for: Any, tmp_path: Path
) -> None:
    (tmp_path / "agent-pw").write_text("agent-secret\n")
    draft = config_for(mosquitto_factory(), tmp_path)  # a device id to put in the password file
    users = {draft.device_id: "agent-secret", "cloud": "cloud-secret"}
    broker = mosquitto_factory(password_file=password_file(tmp_path, users))
    config = config_for(broker, tmp_path, password_file=tmp_path / "agent-pw")
    config = config.model_copy(update={"device_id": draft.device_id})
    assert config.mqtt_username == draft.device_id
    cloud = cloud_for(broker, username="cloud", password="cloud-secret")
    await cloud.publish(f"edge/{config.device_id}/desired", b'{"generation": 1}', retain=True)
    async with Link(config) as link:
        assert await asyncio.wait_for(link.desired.wait(), WAIT_S) == b'{"generation": 1}'


async def test_wrong_password_is_logged_and_retried(
    mosquitto_factory: MosquittoFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker = mosquitto_factory(password_file=password_file(tmp_path, {"agent": "right"}))
    config = config_for(broker, tmp_path, username="agent", password="wrong")
    async with Link(config) as link:
        await until(lambda: messages_logged(caplog, "refused the connection") >= 2, "two refused attempts")
        assert not link.connected
    refusals = [r for r in caplog.records if "refused the connection" in r.getMessage()]
    assert refusals[0].levelno == logging.ERROR
    assert "Not authorized" in refusals[0].getMessage()


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(folder: Path, client_cn: str) -> Pki:
    """A CA, a server certificate for 127.0.0.1 and a client certificate for ``client_cn``."""
    now = dt.datetime.now(dt.timezone.utc)

    def key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    def cert(
        cn: str, subject_key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: Any, ca: bool
    ) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(issuer)
            .public_key(subject_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if cn == "127.0.0.1":
            loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
            builder = builder.add_extension(x509.SubjectAlternativeName([loopback]), critical=False)
        return builder.sign(signer, hashes.SHA256())

    def write(name: str, obj: Any) -> Path:
        path = folder / name
        if isinstance(obj, x509.Certificate):
            path.write_bytes(obj.public_bytes(serialization.Encoding.PEM))
        else:
            pem, pkcs8 = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
            path.write_bytes(obj.private_bytes(pem, pkcs8, serialization.NoEncryption()))
        return path

    ca_key, server_key, client_key = key(), key(), key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edge test CA")])
    ca_cert = cert("edge test CA", ca_key, ca_name, ca_key, True)
    return Pki(
        ca=write("ca.pem", ca_cert),
        server_cert=write("server.pem", cert("127.0.0.1", server_key, ca_name, ca_key, False)),
        server_key=write("server.key", server_key),
        client_cert=write("client.pem", cert(client_cn, client_key, ca_name, ca_key, False)),
        client_key=write("client.key", client_key),
    )


def tls_broker(factory: MosquittoFactory, pki: Pki) -> tuple[MosquittoBroker, int]:
    """A broker whose main listener wants TLS with client certificates, plus a plain one for the cloud."""
    plain_port = free_port()
    broker = factory(
        f"cafile {pki.ca}\ncertfile {pki.server_cert}\nkeyfile {pki.server_key}\n"
        "require_certificate true\nuse_identity_as_username true\n"
        f"listener {plain_port} 127.0.0.1\n"
    )
    return broker, plain_port


async def test_tls_with_client_certificate(mosquitto_factory: MosquittoFactory, tmp_path: Path) -> None:
    device_id = f"dev-{uuid.uuid4().hex[:10]}"
    pki = make_pki(tmp_path, device_id)
    broker, plain_port = tls_broker(mosquitto_factory, pki)
    config = config_for(
        broker,
        tmp_path,
        url=f"mqtts://127.0.0.1:{broker.port}",
        ca_file=pki.ca,
        client_cert=pki.client_cert,
        client_key=pki.client_key,
    ).model_copy(update={"device_id": device_id})
    cloud = Cloud("127.0.0.1", plain_port)
    try:
        await cloud.publish(f"edge/{device_id}/desired", b'{"generation": 9}', retain=True)
        async with Link(config) as link:
            assert await asyncio.wait_for(link.desired.wait(), WAIT_S) == b'{"generation": 9}'
    finally:
        cloud.close()


async def test_tls_with_an_untrusted_server_is_logged_and_retried(
    mosquitto_factory: MosquittoFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "server").mkdir()
    (tmp_path / "client").mkdir()
    server_pki = make_pki(tmp_path / "server", "unused")
    client_pki = make_pki(tmp_path / "client", "dev-x")  # trusts another CA than the server's
    broker, _ = tls_broker(mosquitto_factory, server_pki)
    config = config_for(
        broker,
        tmp_path,
        url=f"mqtts://127.0.0.1:{broker.port}",
        ca_file=client_pki.ca,
        client_cert=client_pki.client_cert,
        client_key=client_pki.client_key,
    )
    async with Link(config) as link:
        await until(lambda: messages_logged(caplog, "certificate verify failed") >= 2, "two TLS failures")
        assert not link.connected
