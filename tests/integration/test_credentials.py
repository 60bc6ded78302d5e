"""Registry credentials end to end: a registry with htpasswd auth, the cloud's CLI, a real agent.

A device provisioned by ``edgectl device add`` runs the real agent (real Link to Mosquitto, real
Docker Engine). The deployment names a cloud credential; the password must reach the agent
sealed to its key only: a wrong one fails the pull with the registry's answer (seen in the
device's report and in ``edgectl device show``), rotating it fixes the pull without touching the
manifest, and no broker message ever carries the password. Skipped loudly without the parts.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import text

from agent.agent import Agent
from agent.cli import build_runtime
from agent.config import load_agent_config
from agent.credentials import CredentialError, resolve_credential
from agent.health import HealthProber
from agent.link import Link
from agent.runtime.labels import loaded_tag
from cloud.config import resolve_settings
from cloud.fleet.ingest import Ingestor
from cloud.keys import PUBLIC_KEY_FILE
from cloud.store.db import open_database
from edgemqtt.endpoint import Endpoint
from modules.contract import DesiredState
from modules.sealing import load_private, new_key_pair
from modules.signing import load_public_key_file, verify_desired
from tests.integration.module_image import scratch_image
from tests.services import MosquittoBroker, MosquittoFactory, RegistryServer, start_or_skip

pytestmark = pytest.mark.integration

USER = "puller"
PASSWORD = "Pa55-" + uuid.uuid4().hex  # distinctive: grep-able in every byte that crosses the broker
WRONG = "not-the-password"


@pytest.fixture
def auth_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistryServer]:
    """A registry of this test's own that requires ``USER`` / ``PASSWORD`` (htpasswd, bcrypt)."""
    workdir = tmp_path / "auth-registry"
    workdir.mkdir()

    def start() -> RegistryServer:
        server = RegistryServer(workdir, users={USER: PASSWORD})
        server.start()
        return server

    server = start_or_skip(request.config, "registry", start)
    yield server
    server.stop()


class Sniffer:
    """Subscribes to everything on the broker, as the cloud's side could, and keeps every payload."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.payloads: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sniff-{uuid.uuid4().hex[:6]}")
        self.client.on_connect = lambda c, *_: c.subscribe("#", qos=1)
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_message = self._keep
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        assert subscribed.wait(30), "sniffer did not subscribe"

    def _keep(self, _c: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.payloads.append((message.topic, bytes(message.payload)))

    def desired(self, device: str) -> list[DesiredState]:
        with self.lock:
            return [
                DesiredState.model_validate_json(p)
                for t, p in self.payloads
                if t == f"edge/{device}/desired" and p
            ]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def push_private(client: Any, registry: RegistryServer, local: str) -> str:
    """Push ``local`` into the auth registry (right credential); its pinned reference, not kept here."""
    target = f"{registry.address}/edge/private"
    client.images.get(local).tag(target, "1")
    auth = {"username": USER, "password": PASSWORD}
    for line in client.api.push(target, tag="1", auth_config=auth, stream=True, decode=True):
        assert "error" not in line, line
    [pinned] = [d for d in client.images.get(f"{target}:1").attrs["RepoDigests"] if d.startswith(target)]
    for ref in (f"{target}:1", pinned):
        with contextlib.suppress(Exception):
            client.images.remove(ref)
    return pinned


@contextlib.asynccontextmanager
async def agent_of(bundle: Path) -> AsyncIterator[Agent]:
    """The real agent as ``edge-agent run --config bundle/agent.yaml`` would run it, in this loop."""
    config = load_agent_config(bundle / "agent.yaml")
    runtime = build_runtime(config)
    async with Link(config) as link:
        agent = Agent(
            config,
            runtime,
            link,
            public_key=load_public_key_file(config.cloud_public_key),
            accelerators=[],
            prober=HealthProber(start_period_s=config.health_start_period_s),
        )
        task = asyncio.create_task(agent.run())
        try:
            yield agent
        finally:
            agent.stop()
            await asyncio.wait_for(task, 60)
            await runtime.close()


async def test_a_sealed_credential_pulls_rotates_and_never_crosses_the_broker_in_clear(
    tmp_path: Path,
    mosquitto_factory: MosquittoFactory,
    auth_registry: RegistryServer,
    docker_client: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cloud.cli import main

    broker = mosquitto_factory()
    url = f"mqtt://127.0.0.1:{broker.port}"
    data = tmp_path / "data"
    device = f"cred-{uuid.uuid4().hex[:8]}"
    bundle = tmp_path / device

    def cli(*argv: str, publish: bool = False) -> str:
        code = main([*argv, "--data-dir", str(data), *(["--broker-url", url] if publish else [])])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert PASSWORD not in out + err and WRONG not in out + err
        return out

    pinned = push_private(
        docker_client, auth_registry, scratch_image(docker_client, f"edgedeploy-test/cred-{device}:1")
    )
    cli(
        "device",
        "add",
        device,
        "--out",
        str(bundle),
        "--state-dir",
        str(bundle / "state"),
        "--runtime",
        "docker",
        "--broker-url",
        url,
    )
    assert "sealing_key" in (bundle / "agent.yaml").read_text()
    sniffer = Sniffer(broker)
    db = open_database(resolve_settings(data).db_url)
    try:
        monkeypatch.setenv("REG_PASSWORD", WRONG)
        cli("credential", "set", "site", "--registry", auth_registry.address, "--username", USER,
            "--password-env", "REG_PASSWORD", publish=True)  # fmt: skip
        manifest = tmp_path / "private.yaml"
        manifest.write_text(
            f"name: private\ntarget: {{device_ids: [{device}]}}\nregistry_credentials: [site]\n"
            f"modules:\n  app:\n    images: {{cpu: '{pinned}'}}\n    restart_policy: never\n"
        )
        cli("deploy", "apply", "-f", str(manifest), publish=True)
        listed = json.loads(cli("credential", "list", "--json"))
        assert listed == [
            {
                "name": "site",
                "registry": auth_registry.address,
                "username": USER,
                "revision": 1,
                "updated_at": listed[0]["updated_at"],
                "used_by": ["private"],
            }
        ]
        assert main(["credential", "remove", "site", "--data-dir", str(data)]) == 2
        assert "used by deployment(s) private" in capsys.readouterr().err

        async with Ingestor(db, Endpoint.parse(url), flush_interval_s=0.05), agent_of(bundle):

            def pull_error() -> str:
                shown = json.loads(cli("device", "show", device, "--json"))
                app = (shown.get("state") or {}).get("modules", {}).get("app") or {}
                return str(app.get("message") or "")

            assert await until_long(
                lambda: "unauthorized" in pull_error().lower() or "authentication" in pull_error().lower()
            ), f"the wrong credential did not fail the pull visibly; device show says: {pull_error()!r}"
            first = sniffer.desired(device)[-1]
            assert not _present(docker_client, pinned)

            # Rotation: the manifest stays, the credential changes; the device gets only that.
            monkeypatch.setenv("REG_PASSWORD", PASSWORD)
            out = cli("credential", "set", "site", "--registry", auth_registry.address, "--username", USER,
                      "--password-env", "REG_PASSWORD", publish=True)  # fmt: skip
            assert "set (revision 2): 1 new desired state(s), 1 published" in out
            assert await until_long(lambda: _present(docker_client, pinned)), (
                f"the rotated credential did not pull the image; device show says: {pull_error()!r}"
            )
        second = sniffer.desired(device)[-1]
        assert second.generation == first.generation + 1
        assert second.modules == first.modules
        [ref] = second.registry_credentials
        assert (ref.name, ref.revision, ref.username, ref.registry) == (
            "site",
            2,
            USER,
            auth_registry.address,
        )

        # Only this device's key opens it, and only for this device id.
        verify_desired(second, load_public_key_file(bundle / PUBLIC_KEY_FILE))
        key = load_private(load_agent_config(bundle / "agent.yaml").sealing_key.get_secret_value())  # type: ignore[union-attr]
        assert resolve_credential(ref, device, {}, key) == (USER, PASSWORD)
        with pytest.raises(CredentialError, match="cannot be opened with this device's key"):
            resolve_credential(ref, device, {}, load_private(new_key_pair()[0]))
        with pytest.raises(CredentialError, match="cannot be opened"):
            resolve_credential(ref, "another-device", {}, key)
    finally:
        sniffer.close()
        db.dispose()
        for container in docker_client.containers.list(
            all=True, filters={"label": f"io.edgedeploy.device={device}"}
        ):
            container.remove(force=True)
        with contextlib.suppress(Exception):
            docker_client.images.remove(pinned)

    with sniffer.lock:
        traffic = b"".join(p for _, p in sniffer.payloads)
    assert traffic, "the sniffer saw no traffic"
    for secret in (PASSWORD, WRONG):
        for form in (
            secret.encode(),
            base64.b64encode(secret.encode()),
            base64.b64encode(f"{USER}:{secret}".encode()),
        ):
            assert form not in traffic, f"a form of the password crossed the broker: {form!r}"


async def until_long(check: Any, timeout_s: float = 120.0) -> bool:
    """Like ``until``, for pulls and reports that take a while; errors count as not yet."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        with contextlib.suppress(Exception):
            if await asyncio.to_thread(check):
                return True
        await asyncio.sleep(0.5)
    return False


def _present(client: Any, ref: str) -> bool:
    """Docker Engine has ``ref``: by its digest (an engine pull), or by the tag the agent's own
    resumable pull gives what it loads (``labels.loaded_tag``: a load cannot set a digest)."""
    for name in (ref, loaded_tag(ref)):
        try:
            client.images.get(name)
        except Exception:
            continue
        return True
    return False


def test_packaging_pulls_a_private_base_image_with_the_stored_credential(
    tmp_path: Path,
    registry: RegistryServer,
    auth_registry: RegistryServer,
    docker_client: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cloud.cli import main
    from tests.integration.test_base_image import cpu_base_or_skip, forget_reference
    from tests.integration.test_packaging import train_digits

    base = cpu_base_or_skip(registry, docker_client)
    private = f"{auth_registry.address}/edge/base-cpu"
    docker_client.images.pull(base).tag(private, "1")
    auth = {"username": USER, "password": PASSWORD}
    for line in docker_client.api.push(private, tag="1", auth_config=auth, stream=True, decode=True):
        assert "error" not in line, line
    forget_reference(docker_client, f"{private}:1")
    data = tmp_path / "data"
    model = train_digits(tmp_path / "digits", (16,), 0)
    config = tmp_path / "inference.yaml"
    config.write_text(f"base_image: {private}:1\n")
    common = ["--data-dir", str(data)]
    assert main(["model", "register", str(model / "model.onnx"), "--name", "digits", *common]) == 0
    package = ["package", "--model", "digits:1", "--config", str(config), "--profile", "cpu",
               "--registry", registry.address, "--no-smoke", *common]  # fmt: skip
    capsys.readouterr()
    try:
        assert main(package) == 1
        assert "is not available here" in capsys.readouterr().err

        monkeypatch.setenv("REG_PASSWORD", PASSWORD)
        assert main(["credential", "set", "base", "--registry", auth_registry.address, "--username", USER,
                     "--password-env", "REG_PASSWORD", *common]) == 0  # fmt: skip
        capsys.readouterr()
        assert main(package) == 0
        out, err = capsys.readouterr()
        assert f"pulling base image {private}:1 with the stored credential for {auth_registry.address}" in err
        assert PASSWORD not in out + err
        assert f"{registry.address}/digits@sha256:" in out
    finally:
        forget_reference(docker_client, f"{private}:1")


def test_apply_refuses_unknown_credentials_and_keyless_devices_and_recompute_keeps_generations(
    tmp_path: Path,
) -> None:
    from cloud.fleet.credentials import decrypt_password
    from cloud.fleet.service import ApplyError, Fleet
    from cloud.keys import load_or_create_signing_key
    from cloud.store.devices import Device
    from cloud.store.errors import InvalidInputError
    from modules.contract import DeploymentManifest
    from modules.profiles import load_profiles

    db = open_database(f"sqlite:///{tmp_path / 'edge.db'}")
    with db.transaction() as s:
        s.add(Device(id="new-1", profile="cpu", password_hash="x", sealing_public_key=new_key_pair()[1]))
        s.add(Device(id="old-1", profile="cpu", password_hash="x"))
    fleet = Fleet(db, load_or_create_signing_key(tmp_path), load_profiles())
    try:

        def manifest(*ids: str) -> DeploymentManifest:
            return DeploymentManifest.model_validate(
                {
                    "name": "private",
                    "target": {"device_ids": list(ids)},
                    "registry_credentials": ["site"],
                    "modules": {"app": {"images": {"cpu": "reg.local:5000/app:1"}}},
                }
            )

        with pytest.raises(ApplyError, match="unknown credential 'site'"):
            fleet.apply(manifest("new-1"))
        fleet.set_credential("site", "reg.local:5000", USER, PASSWORD)
        with pytest.raises(ApplyError, match="device\\(s\\) old-1 have no sealing key"):
            fleet.apply(manifest("new-1", "old-1"))
        assert fleet.apply(manifest("new-1")).new_generations == 1
        assert fleet.recompute() == 0, "re-sealing alone must not make a new generation"
        revision, created, new, _ = fleet.set_credential("site", "reg.local:5000", USER, PASSWORD)
        assert (revision, created, new) == (1, False, 0), "an unchanged credential changes nothing"
        revision, _, new, _ = fleet.set_credential("site", "reg.local:5000", USER, "rotated-" + PASSWORD)
        assert (revision, new) == (2, 1)
        with db.transaction() as s:
            payloads = [p for (p,) in s.execute(text("SELECT payload FROM device_desired"))]
            stored = [p for (p,) in s.execute(text("SELECT password FROM registry_credentials"))]
        assert payloads and not any(PASSWORD in p for p in payloads)
        assert stored and not any(PASSWORD in p for p in stored), "passwords are encrypted at rest"
        other = load_or_create_signing_key(tmp_path / "other")
        with pytest.raises(InvalidInputError, match="stored with another signing key: set it again"):
            decrypt_password(other, "site", stored[0])
        assert decrypt_password(fleet.key, "site", stored[0]) == "rotated-" + PASSWORD
    finally:
        fleet.close()
