"""A real Mosquitto run with the files ``edgectl`` generates: credentials, ACLs and a hostile device.

The broker is started with ``mosquitto -c <edgectl broker config output>`` (on a free port), so
the password file, the ACL file and the configuration under test are exactly what operators get.
Devices connect with the credentials from the agent configuration ``edgectl device add`` wrote.

"Nothing arrives" checks are bounded absence checks behind a fence: the forbidden message is sent
first, then an allowed one on the same connection; once the allowed one has arrived, the broker
has processed the forbidden one, and a short extra wait shows nothing else comes.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import queue
import subprocess
import threading
import uuid
from collections.abc import Iterator
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

from agent.config import load_agent_config
from cloud import broker as broker_files
from cloud.cli import main
from cloud.config import resolve_settings
from cloud.devices import DeviceManager
from tests.services import (
    HOST,
    ManagedProcess,
    ServiceUnavailable,
    find_binary,
    free_port,
    port_open,
    start_or_skip,
    wait_until,
)

pytestmark = pytest.mark.integration

WAIT_S = 30.0
ABSENCE_S = 1.0
NOT_AUTHORIZED = 0x87
REFUSED = (0x86, 0x87)  # bad user name or password / not authorized (Mosquitto 2.0 sends 0x87)
ACCEPTED = (0x00, 0x10)  # success, or success with "no matching subscribers"


class GeneratedBroker(ManagedProcess):
    """``mosquitto -c`` with the configuration ``edgectl broker config`` wrote."""

    name = "mosquitto"

    def __init__(self, workdir: Path, conf_file: Path, port: int) -> None:
        super().__init__(workdir, port)
        binary = find_binary("mosquitto")
        if binary is None:
            raise ServiceUnavailable("mosquitto not installed: apt-get install mosquitto")
        self.binary = binary
        self.conf_file = conf_file

    def argv(self) -> list[str]:
        return [self.binary, "-c", str(self.conf_file)]

    def ready(self) -> bool:
        return port_open(self.host, self.port)


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


class Client:
    """A synchronous MQTT v5 client that records what it receives and each acknowledgement's reason."""

    def __init__(self, port: int, username: str, password: str, client_id: str | None = None) -> None:
        self.messages: queue.Queue[Received] = queue.Queue()
        self.connacks: queue.Queue[int] = queue.Queue()
        self._subacks: dict[int, list[int]] = {}
        self._pubacks: dict[int, int] = {}
        self._acked = threading.Condition()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"{username}-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
        )
        self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, u, f, reason, p: self.connacks.put(reason.value)
        self.client.on_message = lambda c, u, m: self.messages.put(
            Received(m.topic, bytes(m.payload), bool(m.retain))
        )
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.disconnected = threading.Event()
        self.client.on_disconnect = lambda *args: self.disconnected.set()
        self.port = port

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: list[Any], props: Any) -> None:
        with self._acked:
            self._subacks[mid] = [r.value for r in reasons]
            self._acked.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._acked:
            self._pubacks[mid] = reason.value
            self._acked.notify_all()

    def connect(self) -> int:
        """Connect and return the CONNACK reason code (0 is success)."""
        self.client.connect(HOST, self.port, keepalive=30)
        self.client.loop_start()
        try:
            return self.connacks.get(timeout=WAIT_S)
        except queue.Empty:
            raise AssertionError("no CONNACK from the broker") from None

    def subscribe(self, topic: str) -> int:
        """Subscribe at QoS 1 and return the SUBACK reason code."""
        _, mid = self.client.subscribe(topic, qos=1)
        assert mid is not None, f"subscribe to {topic} was not sent"
        with self._acked:
            assert self._acked.wait_for(lambda: mid in self._subacks, WAIT_S), f"no SUBACK for {topic}"
            return self._subacks[mid][0]

    def publish(self, topic: str, payload: str, retain: bool = False) -> int:
        """Publish at QoS 1 and return the PUBACK reason code."""
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        with self._acked:
            assert self._acked.wait_for(lambda: info.mid in self._pubacks, WAIT_S), f"no PUBACK for {topic}"
            return self._pubacks[info.mid]

    def next(self, timeout: float = WAIT_S) -> Received:
        """The next message received, failing when none comes within ``timeout``."""
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message within {timeout}s") from None

    def received_nothing_more(self) -> list[Received]:
        """After a fence message arrived: whatever else arrives within a short bounded wait."""
        extra = []
        try:
            while True:
                extra.append(self.messages.get(timeout=ABSENCE_S))
        except queue.Empty:
            return extra

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@dataclass
class Fleet:
    """A data directory with provisioned devices, its generated broker, and MQTT clients on it."""

    data_dir: Path
    port: int
    cloud_port: int
    broker: GeneratedBroker
    passwords: dict[str, str]
    cloud_password: str
    clients: list[Client]

    def client(
        self,
        username: str,
        password: str | None = None,
        *,
        client_id: str | None = None,
        port: int | None = None,
    ) -> Client:
        secret = self.passwords[username] if password is None else password
        c = Client(port or self.port, username, secret, client_id)
        self.clients.append(c)
        return c

    def device(self, device_id: str) -> Client:
        c = self.client(device_id)
        assert c.connect() == 0, f"device {device_id} could not connect"
        return c

    def cloud(self) -> Client:
        c = self.client(broker_files.CLOUD_USER, self.cloud_password, port=self.cloud_port)
        assert c.connect() == 0, "the cloud user could not connect"
        return c


def edgectl(data_dir: Path, *argv: str) -> None:
    code = main(["--data-dir", str(data_dir), *argv])
    assert code == 0, f"edgectl {' '.join(argv)} exited {code}"


def password_from_config(config_file: Path) -> str:
    """The device password as the agent reads it from the generated configuration."""
    config = load_agent_config(config_file)
    password = config.broker.read_password()
    assert password is not None
    return password


@pytest.fixture
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    data_dir = tmp_path / "data"
    port, cloud_port = free_port(), free_port()
    out = tmp_path / "broker"
    # No --user: as root, what broker config writes must start as written (it used to drop to
    # the mosquitto user and die "Unable to write pid file").
    edgectl(
        data_dir, "broker", "config", "--out", str(out), "--port", str(port), "--cloud-port", str(cloud_port)
    )
    for device in ("alpha", "beta"):
        edgectl(data_dir, "device", "add", device, "--tag", "site=test")
    process = start_or_skip(
        request.config, "mosquitto", lambda: _started(GeneratedBroker(out, out / "mosquitto.conf", port))
    )
    passwords = {d: password_from_config(data_dir / "devices" / d / "agent.yaml") for d in ("alpha", "beta")}
    _, cloud_password = broker_files.cloud_credentials(broker_files.BrokerPaths.of(data_dir))
    fleet = Fleet(data_dir, port, cloud_port, process, passwords, cloud_password, [])
    yield fleet
    for client in fleet.clients:
        client.close()
    process.stop()


def _started(process: GeneratedBroker) -> GeneratedBroker:
    process.start()
    return process


# ---- credentials ------------------------------------------------------------------------------


def test_our_hashes_match_mosquitto_passwd(tmp_path: Path) -> None:
    tool = find_binary("mosquitto_passwd")
    if tool is None:
        pytest.skip("REAL PART UNAVAILABLE: mosquitto_passwd not installed: apt-get install mosquitto")
    path = tmp_path / "passwd"
    subprocess.run([tool, "-c", "-b", str(path), "pump-7", "s3cret:with spaces"], check=True)
    encoded = broker_files.parse_password_file(path.read_text())["pump-7"]
    iterations, salt, _ = broker_files.parse_hash(encoded)
    assert broker_files.hash_password("s3cret:with spaces", iterations=iterations, salt=salt) == encoded
    assert broker_files.verify_password("s3cret:with spaces", encoded)
    assert not broker_files.verify_password("s3cret", encoded)


def test_provisioned_devices_and_the_cloud_connect_and_exchange_state(fleet: Fleet) -> None:
    cloud = fleet.cloud()
    assert cloud.subscribe("$share/cloud/edge/+/reported") == 1
    assert cloud.publish("edge/alpha/desired", '{"generation": 1}', retain=True) in ACCEPTED

    alpha = fleet.device("alpha")
    assert alpha.subscribe("edge/alpha/desired") == 1
    got = alpha.next()
    assert (got.topic, got.payload, got.retain) == ("edge/alpha/desired", b'{"generation": 1}', True)

    assert alpha.publish("edge/alpha/reported", '{"generation_applied": 1}', retain=True) in ACCEPTED
    seen = cloud.next()
    assert (seen.topic, seen.payload) == ("edge/alpha/reported", b'{"generation_applied": 1}')

    assert cloud.subscribe("$share/cloud/edge/+/heartbeat") == 1
    assert alpha.publish("edge/alpha/heartbeat", '{"beat": 1}') in ACCEPTED
    seen = cloud.next()
    assert (seen.topic, seen.payload) == ("edge/alpha/heartbeat", b'{"beat": 1}')


def test_cloud_can_clear_a_removed_devices_retained_messages(fleet: Fleet) -> None:
    alpha = fleet.device("alpha")
    assert alpha.publish("edge/alpha/reported", '{"generation_applied": 1}', retain=True) in ACCEPTED
    assert alpha.publish("edge/alpha/online", '{"online": true}', retain=True) in ACCEPTED
    cloud = fleet.cloud()
    for topic in ("edge/alpha/reported", "edge/alpha/online"):
        assert cloud.publish(topic, "", retain=True) in ACCEPTED, f"the cloud may not clear {topic}"
    late = fleet.cloud()
    for topic in ("edge/alpha/reported", "edge/alpha/online", "edge/alpha/cmd/res/#"):
        assert late.subscribe(topic) == 1
    # Retained messages arrive right after their SUBACK: once a live fence arrives, none came.
    assert alpha.publish("edge/alpha/cmd/res/fence", "{}") in ACCEPTED
    arrived = [late.next()]
    arrived += late.received_nothing_more()
    assert [m.topic for m in arrived] == ["edge/alpha/cmd/res/fence"], arrived


def test_wrong_password_and_unknown_user_are_refused(fleet: Fleet) -> None:
    assert fleet.client("alpha", "not-the-password").connect() in REFUSED
    assert fleet.client("alpha", fleet.passwords["beta"]).connect() in REFUSED
    assert fleet.client("gamma", fleet.passwords["alpha"]).connect() in REFUSED


# ---- a hostile device -------------------------------------------------------------------------


def test_device_cannot_read_another_devices_desired_state(fleet: Fleet) -> None:
    cloud = fleet.cloud()
    cloud.publish("edge/beta/desired", '{"secret": "beta"}', retain=True)
    cloud.publish("edge/alpha/desired", '{"fence": 1}', retain=True)

    alpha = fleet.device("alpha")
    code = alpha.subscribe("edge/beta/desired")
    assert code in (1, NOT_AUTHORIZED), f"unexpected SUBACK {code:#x}"
    assert alpha.subscribe("edge/+/desired") in (1, NOT_AUTHORIZED)
    assert alpha.subscribe("edge/alpha/desired") == 1
    # Retained messages come in subscription order: the fence arrives after anything for beta would.
    arrived = [alpha.next()]
    while arrived[-1].payload != b'{"fence": 1}':
        arrived.append(alpha.next())
    cloud.publish("edge/beta/desired", '{"secret": "beta, live"}', retain=True)
    cloud.publish("edge/alpha/desired", '{"fence": 2}', retain=True)
    arrived.append(alpha.next())
    arrived += alpha.received_nothing_more()
    assert {m.topic for m in arrived} == {"edge/alpha/desired"}, arrived
    assert all(b"beta" not in m.payload for m in arrived)


def test_device_cannot_publish_to_another_devices_topics(fleet: Fleet) -> None:
    cloud = fleet.cloud()
    assert cloud.subscribe("$share/cloud/edge/+/reported") == 1
    assert cloud.subscribe("edge/+/online") == 1
    alpha = fleet.device("alpha")

    assert alpha.publish("edge/beta/reported", '{"forged": true}', retain=True) == NOT_AUTHORIZED
    assert alpha.publish("edge/beta/online", '{"online": false}', retain=True) == NOT_AUTHORIZED
    assert alpha.publish("edge/beta/cmd/res/1", '{"forged": true}') == NOT_AUTHORIZED
    assert alpha.publish("edge/beta/heartbeat", '{"forged": true}') == NOT_AUTHORIZED
    assert alpha.publish("edge/alpha/reported", '{"fence": true}') in ACCEPTED
    arrived = [cloud.next(), *cloud.received_nothing_more()]
    assert [(m.topic, m.payload) for m in arrived] == [("edge/alpha/reported", b'{"fence": true}')]

    # Nothing was retained for beta either: a fresh cloud subscriber finds no forged state.
    late = fleet.cloud()
    late.subscribe("edge/beta/reported")
    late.subscribe("edge/beta/online")
    assert late.received_nothing_more() == []


def test_device_cannot_forge_its_own_desired_state_or_commands(fleet: Fleet) -> None:
    cloud = fleet.cloud()
    cloud.publish("edge/alpha/desired", '{"signed": "by the cloud"}', retain=True)
    watcher = fleet.device("alpha")
    assert watcher.subscribe("edge/alpha/desired") == 1
    assert watcher.subscribe("edge/alpha/cmd/req/+") == 1
    assert watcher.next().payload == b'{"signed": "by the cloud"}'

    # One connection per device: the client id is the username, so a second would take this over.
    assert watcher.publish("edge/alpha/desired", '{"forged": true}', retain=True) == NOT_AUTHORIZED
    assert watcher.publish("edge/alpha/cmd/req/1", '{"name": "restart"}') == NOT_AUTHORIZED
    cloud.publish("edge/alpha/cmd/req/2", '{"name": "ping"}')
    arrived = [watcher.next(), *watcher.received_nothing_more()]
    assert [(m.topic, m.payload) for m in arrived] == [("edge/alpha/cmd/req/2", b'{"name": "ping"}')]

    fresh = fleet.device("alpha")
    fresh.subscribe("edge/alpha/desired")
    assert fresh.next().payload == b'{"signed": "by the cloud"}'


def test_a_device_cannot_knock_another_off_with_its_client_id(fleet: Fleet) -> None:
    beta = fleet.device("beta")
    assert beta.subscribe("edge/beta/desired") == 1
    hostile = fleet.client("alpha", client_id="beta")  # alpha's own credentials, beta's client id
    assert hostile.connect() == 0
    hostile_again = fleet.client("alpha", client_id="beta")
    assert hostile_again.connect() == 0
    assert not beta.disconnected.wait(3 * ABSENCE_S), "a device with another's client id knocked it off"
    assert beta.publish("edge/beta/reported", "{}") in ACCEPTED
    # The broker gave the hostile connections alpha's id: the second took the first one over.
    assert hostile.disconnected.wait(WAIT_S)


def test_cloud_workers_keep_their_own_client_ids(fleet: Fleet) -> None:
    first, second = fleet.cloud(), fleet.cloud()
    assert not first.disconnected.wait(2 * ABSENCE_S), "a second cloud worker knocked the first off"
    assert first.subscribe("edge/+/reported") == second.subscribe("edge/+/reported") == 1


def test_device_answers_commands_and_sets_its_last_will(fleet: Fleet) -> None:
    cloud = fleet.cloud()
    assert cloud.subscribe("edge/+/cmd/res/#") == 1
    assert cloud.subscribe("edge/+/online") == 1
    beta = fleet.client("beta")
    beta.client.will_set("edge/beta/online", '{"online": false}', qos=1, retain=True)
    assert beta.connect() == 0
    assert beta.publish("edge/beta/online", '{"online": true}', retain=True) in ACCEPTED
    assert beta.publish("edge/beta/cmd/res/7", '{"ok": true}') in ACCEPTED
    got = {cloud.next().topic, cloud.next().topic}
    assert got == {"edge/beta/online", "edge/beta/cmd/res/7"}

    sock = beta.client.socket()
    assert sock is not None
    sock.close()  # an unclean drop: the broker publishes the will
    will = cloud.next()
    assert (will.topic, json.loads(will.payload)) == ("edge/beta/online", {"online": False})


# ---- changes while the broker runs ------------------------------------------------------------


def test_removed_device_cannot_connect_after_reload_and_new_one_can(fleet: Fleet) -> None:
    beta = fleet.device("beta")
    alpha = fleet.device("alpha")
    assert alpha.subscribe("edge/alpha/desired") == 1

    edgectl(fleet.data_dir, "device", "remove", "beta")  # rewrites the files and sends SIGHUP
    assert wait_until(lambda: fleet.client("beta").connect() in REFUSED, WAIT_S), (
        "beta still connects after removal and reload"
    )
    assert beta.disconnected.wait(WAIT_S), "the broker kept the removed device's session open"
    fleet.cloud().publish("edge/alpha/desired", '{"after": "reload"}')
    assert alpha.next().payload == b'{"after": "reload"}'  # alpha's session survived the reload
    assert not alpha.disconnected.is_set()

    edgectl(fleet.data_dir, "device", "add", "gamma")
    gamma_password = password_from_config(fleet.data_dir / "devices" / "gamma" / "agent.yaml")
    assert wait_until(lambda: fleet.client("gamma", gamma_password).connect() == 0, WAIT_S), (
        "the new device cannot connect after reload"
    )


def test_generated_agent_config_reaches_the_broker(fleet: Fleet) -> None:
    config = load_agent_config(fleet.data_dir / "devices" / "alpha" / "agent.yaml")
    assert (config.broker.host, config.broker.port) == (HOST, fleet.port)
    assert config.mqtt_username == "alpha"
    settings = resolve_settings(fleet.data_dir)
    manager = DeviceManager.open(settings)
    try:
        assert [d.id for d in manager.list_devices(tags={"site": "test"})] == ["alpha", "beta"]
    finally:
        manager.close()
    assert (
        config.cloud_public_key.read_bytes() == (fleet.data_dir / "keys" / "cloud-signing.pub").read_bytes()
    )


# ---- TLS ----------------------------------------------------------------------------------------


def write_server_pki(folder: Path) -> tuple[Path, Path, Path]:
    """``(ca, server certificate for 127.0.0.1, server key)`` as PEM files."""
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "edgedeploy test CA")])

    def build(subject: x509.Name, key: ec.EllipticCurvePrivateKey, ca: bool) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )

    ca_cert = build(ca_name, ca_key, True).sign(ca_key, hashes.SHA256())
    server_cert = (
        build(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)]), server_key, False)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return paths


def test_tls_listener_and_agent_config_with_its_ca(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    ca, cert, key = write_server_pki(pki)
    data_dir, out, port = tmp_path / "data", tmp_path / "broker", free_port()
    edgectl(
        data_dir,
        "broker",
        "config",
        "--out",
        str(out),
        "--port",
        str(port),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
        "--ca",
        str(ca),
        "--cloud-port",
        str(free_port()),
    )
    edgectl(data_dir, "device", "add", "alpha")
    process = start_or_skip(
        request.config, "mosquitto", lambda: _started(GeneratedBroker(out, out / "mosquitto.conf", port))
    )
    try:
        config = load_agent_config(data_dir / "devices" / "alpha" / "agent.yaml")
        assert config.broker.url == f"mqtts://{HOST}:{port}"
        assert config.broker.ca_file is not None and config.broker.ca_file.read_bytes() == ca.read_bytes()
        password = config.broker.read_password()
        assert password is not None

        device = Client(port, "alpha", password)
        device.client.tls_set(ca_certs=str(config.broker.ca_file))
        try:
            assert device.connect() == 0
            assert device.publish("edge/alpha/reported", "{}") in ACCEPTED
            assert device.publish("edge/other/reported", "{}") == NOT_AUTHORIZED
        finally:
            device.close()

        plain = Client(port, "alpha", password)
        plain.client.connect(HOST, port)
        plain.client.loop_start()
        try:
            assert plain.disconnected.wait(WAIT_S), "plain MQTT on the TLS listener was not dropped"
            assert plain.connacks.empty()
        finally:
            plain.close()
    finally:
        process.stop()
