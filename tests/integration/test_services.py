"""The service fixtures start real parts that work: Mosquitto (with a restart) and the registry."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import queue
import tarfile
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.services import MosquittoBroker, MosquittoFactory, RegistryServer

pytestmark = pytest.mark.integration

WAIT_S = 20.0
MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json"
)


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Probe:
    """A paho-mqtt 2.x client on its own network thread that records connects and messages.

    It (re)subscribes to ``subscribe`` on every connect, so it keeps receiving after a broker
    restart once paho has reconnected.
    """

    def __init__(self, broker: MosquittoBroker, subscribe: str | None = None) -> None:
        self.subscribe = subscribe
        self.connects: queue.Queue[mqtt.ReasonCode] = queue.Queue()
        self.messages: queue.Queue[Received] = queue.Queue()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{uuid.uuid4().hex[:8]}")
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.connect(broker.host, broker.port, keepalive=10)
        self.client.loop_start()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self.subscribe is not None and not reason.is_failure:
            client.subscribe(self.subscribe, qos=1)
        self.connects.put(reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.messages.put(Received(message.topic, bytes(message.payload), message.qos, message.retain))

    def wait_connected(self) -> None:
        try:
            reason = self.connects.get(timeout=WAIT_S)
        except queue.Empty:
            pytest.fail(f"no MQTT CONNACK within {WAIT_S:.0f}s")
        assert not reason.is_failure, f"broker refused the connection: {reason}"

    def next_message(self) -> Received:
        try:
            return self.messages.get(timeout=WAIT_S)
        except queue.Empty:
            pytest.fail(f"no MQTT message on {self.subscribe!r} within {WAIT_S:.0f}s")

    def publish(self, topic: str, payload: bytes, retain: bool) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(timeout=WAIT_S)
        assert info.is_published(), f"PUBACK for {topic} not received"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextmanager
def probe(broker: MosquittoBroker, subscribe: str | None = None) -> Iterator[Probe]:
    client = Probe(broker, subscribe)
    try:
        client.wait_connected()
        yield client
    finally:
        client.close()


def test_retained_qos1_message_reaches_a_later_subscriber(mosquitto: MosquittoBroker) -> None:
    topic = f"edge/test-{uuid.uuid4().hex[:8]}/desired"
    payload = json.dumps({"generation": 1}).encode()
    with probe(mosquitto) as publisher:
        publisher.publish(topic, payload, retain=True)

    with probe(mosquitto, subscribe=topic) as subscriber:
        received = subscriber.next_message()

    assert received == Received(topic, payload, qos=1, retain=True)


def test_client_reconnects_after_broker_restart_and_retained_state_survives(
    mosquitto_factory: MosquittoFactory,
) -> None:
    broker = mosquitto_factory()
    port = broker.port
    topic = "edge/restart-test/reported"
    with probe(broker, subscribe=topic) as subscriber:
        with probe(broker) as publisher:
            publisher.publish(topic, b"before", retain=True)
        assert subscriber.next_message().payload == b"before"

        broker.restart()

        assert broker.port == port
        subscriber.wait_connected()
        after_restart = subscriber.next_message()
        assert (after_restart.payload, after_restart.retain) == (b"before", True)
        with probe(broker) as publisher:
            publisher.publish(topic, b"after", retain=False)
        assert subscriber.next_message() == Received(topic, b"after", qos=1, retain=False)


def _tiny_rootfs(text: str) -> bytes:
    """An uncompressed tar holding one file, ``hello.txt``, for ``docker import``."""
    buffer = io.BytesIO()
    data = text.encode()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        member = tarfile.TarInfo("hello.txt")
        member.size = len(data)
        member.mode = 0o644
        tar.addfile(member, io.BytesIO(data))
    return buffer.getvalue()


def _get(url: str, accept: str | None = None) -> tuple[bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read(), dict(response.headers)


def test_pushed_image_manifest_and_layer_read_back_from_registry(
    docker_client: Any, registry: RegistryServer
) -> None:
    text = f"edgedeploy registry test {uuid.uuid4().hex}\n"
    repository = f"{registry.address}/edgedeploy-test/tiny"
    docker_client.api.import_image_from_data(_tiny_rootfs(text), repository=repository, tag="1")
    try:
        events = list(docker_client.images.push(repository, tag="1", stream=True, decode=True))
        errors = [event["error"] for event in events if "error" in event]
        assert not errors, f"push failed: {errors}"
        pushed = [event["aux"] for event in events if "Digest" in event.get("aux", {})]
        assert pushed, f"push reported no digest: {events}"
        digest = pushed[-1]["Digest"]

        body, headers = _get(f"{registry.url}/v2/edgedeploy-test/tiny/manifests/1", MANIFEST_TYPES)
        assert headers["Docker-Content-Digest"] == digest
        assert "sha256:" + hashlib.sha256(body).hexdigest() == digest
        manifest = json.loads(body)
        assert len(manifest["layers"]) == 1

        layer_digest = manifest["layers"][0]["digest"]
        blob, _ = _get(f"{registry.url}/v2/edgedeploy-test/tiny/blobs/{layer_digest}")
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer_digest
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as layer:
            hello = layer.extractfile("hello.txt")
            assert hello is not None
            assert hello.read().decode() == text

        tags, _ = _get(f"{registry.url}/v2/edgedeploy-test/tiny/tags/list")
        assert json.loads(tags)["tags"] == ["1"]
        assert f"{repository}@{digest}" in docker_client.images.get(f"{repository}:1").attrs["RepoDigests"]
    finally:
        docker_client.images.remove(f"{repository}:1", force=True)
