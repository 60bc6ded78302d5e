"""Helpers for the agent's integration tests: the cloud side over real MQTT, configs, signed states.

``CloudSide`` is a paho client (the cloud's role): it publishes signed desired states (retained),
records every report and command answer of one device, and lets async tests wait for a report
matching a predicate without blocking the event loop the agent runs on. ``running_agent`` runs an
``Agent`` with a real ``Link`` as an asyncio task in the test's own loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from agent.agent import Agent
from agent.config import AgentConfig, BackoffSettings, BrokerConfig, RestartSettings
from agent.health import HealthProber
from agent.link import Link
from agent.runtime import ModuleRuntime
from modules.contract import CommandRequest, CommandResponse, DesiredState, Heartbeat, ReportedState, utcnow
from modules.signing import generate_keypair, load_private_key, load_public_key, sign_desired

WAIT_S = 60.0


class Keys:
    """A cloud signing key pair, with the public key written where the agent's config points."""

    def __init__(self, folder: Path) -> None:
        private_pem, public_pem = generate_keypair()
        self.private: Ed25519PrivateKey = load_private_key(private_pem)
        self.public = load_public_key(public_pem)
        folder.mkdir(parents=True, exist_ok=True)
        self.public_path = folder / "cloud.pub"
        self.public_path.write_bytes(public_pem)


def agent_config(folder: Path, device_id: str, broker_port: int, keys: Keys, **overrides: Any) -> AgentConfig:
    """A config with small back-off numbers so the tests stay quick."""
    data: dict[str, Any] = {
        "device_id": device_id,
        "broker": BrokerConfig(url=f"mqtt://127.0.0.1:{broker_port}", reconnect_min_s=1, reconnect_max_s=2),
        "cloud_public_key": keys.public_path,
        "state_dir": folder / "state",
        "restart": RestartSettings(base_s=0.5, max_s=2.0, reset_after_s=600),
        "pull_retry": BackoffSettings(base_s=1.0, max_s=5.0),
        "heartbeat_s": 5.0,
    }
    data.update(overrides)
    return AgentConfig(**data)


def desired_state(
    device_id: str,
    generation: int,
    modules: dict[str, Any],
    *,
    key: Ed25519PrivateKey | None,
    ttl_s: float = 3600,
    **fields: Any,
) -> DesiredState:
    """A desired state issued now, signed with ``key`` (unsigned when ``key`` is None)."""
    now = utcnow()
    state = DesiredState.model_validate(
        {
            "device_id": device_id,
            "generation": generation,
            "issued_at": now - timedelta(seconds=max(5.0, 60 - ttl_s)),
            "expires_at": now + timedelta(seconds=ttl_s),
            "modules": modules,
            **fields,
        }
    )
    return sign_desired(state, key) if key is not None else state


def fast_health(**kw: Any) -> dict[str, Any]:
    """A health check that probes every 0.5 s with the default threshold (3 failures in a row).

    A starting module is not restarted while it loads: failures count only once it answered
    (or after the agent's ``health_start_period_s``), so no threshold has to cover start-up.
    """
    return {"interval_s": 0.5, "timeout_s": 2.0, "failure_threshold": 3, **kw}


class CloudSide:
    """The cloud's end of one device's topics, over a real broker."""

    def __init__(self, port: int, device_id: str) -> None:
        self.device_id = device_id
        self.reports: list[ReportedState] = []
        self.heartbeats: list[Heartbeat] = []
        self.responses: dict[str, CommandResponse] = {}
        self._changed = threading.Condition()
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"cloud-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv311,
        )
        self.client.reconnect_delay_set(1, 2)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(WAIT_S):
            raise RuntimeError(f"the cloud side could not subscribe on 127.0.0.1:{port}")

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        d = self.device_id
        client.subscribe([(f"edge/{d}/reported", 1), (f"edge/{d}/heartbeat", 1), (f"edge/{d}/cmd/res/+", 1)])

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._changed:
            if message.topic.endswith("/reported"):
                self.reports.append(ReportedState.model_validate_json(message.payload))
            elif message.topic.endswith("/heartbeat"):
                self.heartbeats.append(Heartbeat.model_validate_json(message.payload))
            else:
                response = CommandResponse.model_validate_json(message.payload)
                self.responses[response.id] = response
            self._changed.notify_all()

    def publish_desired(self, state: DesiredState | bytes) -> None:
        """Publish (retained, QoS 1) a desired state or raw bytes on ``edge/{d}/desired``."""
        payload = state if isinstance(state, bytes) else state.model_dump_json().encode()
        info = self.client.publish(f"edge/{self.device_id}/desired", payload, qos=1, retain=True)
        info.wait_for_publish(WAIT_S)

    def send_command(self, request: CommandRequest) -> None:
        """Publish a command request."""
        topic = f"edge/{self.device_id}/cmd/req/{request.id}"
        self.client.publish(topic, request.model_dump_json().encode(), qos=1).wait_for_publish(WAIT_S)

    def clear_retained(self) -> None:
        """Remove the retained desired state (the session broker is shared between tests)."""
        self.client.publish(f"edge/{self.device_id}/desired", b"", qos=1, retain=True).wait_for_publish(
            WAIT_S
        )

    def _wait(self, check: Callable[[], Any], timeout: float) -> Any:
        with self._changed:
            return self._changed.wait_for(check, timeout)

    async def report(
        self, predicate: Callable[[ReportedState], bool], what: str, timeout: float = WAIT_S
    ) -> ReportedState:
        """The first report (new or already received) matching ``predicate``; fails after ``timeout``."""

        def check() -> ReportedState | None:
            return next((r for r in reversed(self.reports) if predicate(r)), None)

        found = await asyncio.to_thread(self._wait, check, timeout)
        if found is None:
            last = self.reports[-1].model_dump(mode="json") if self.reports else None
            raise AssertionError(f"no report {what} within {timeout:g} s; last report: {json.dumps(last)}")
        return found

    def mark(self) -> int:
        """A position in the reports, for ``next_report(since=...)``."""
        with self._changed:
            return len(self.reports)

    async def next_report(
        self,
        predicate: Callable[[ReportedState], bool],
        what: str,
        timeout: float = WAIT_S,
        since: int | None = None,
    ) -> ReportedState:
        """The first report received after ``since`` (default: from now on) matching ``predicate``."""
        start = self.mark() if since is None else since

        def check() -> ReportedState | None:
            return next((r for r in self.reports[start:] if predicate(r)), None)

        found = await asyncio.to_thread(self._wait, check, timeout)
        if found is None:
            last = self.reports[-1].model_dump(mode="json") if self.reports else None
            raise AssertionError(
                f"no new report {what} within {timeout:g} s; last report: {json.dumps(last)}"
            )
        return found

    async def response(self, command_id: str, timeout: float = WAIT_S) -> CommandResponse:
        """The answer to command ``command_id``."""
        found = await asyncio.to_thread(self._wait, lambda: self.responses.get(command_id), timeout)
        if found is None:
            raise AssertionError(f"no answer to command {command_id} within {timeout:g} s")
        return found

    def close(self) -> None:
        """Clear the device's retained desired state and disconnect."""
        with contextlib.suppress(Exception):
            self.clear_retained()
        self.client.loop_stop()
        self.client.disconnect()


def module_running(name: str) -> Callable[[ReportedState], bool]:
    """Predicate: ``name`` runs, live and ready."""

    def check(r: ReportedState) -> bool:
        m = r.modules.get(name)
        return bool(m and m.runtime_status == "running" and m.health and m.health.live and m.health.ready)

    return check


def status_is(status: str, generation: int | None = None) -> Callable[[ReportedState], bool]:
    """Predicate: the deployment status (and, when given, the applied generation)."""
    return lambda r: (
        r.deployment_status == status and (generation is None or r.generation_applied == generation)
    )


@contextlib.asynccontextmanager
async def running_agent(
    config: AgentConfig, runtime: ModuleRuntime, keys: Keys, *, close_runtime: bool = True, **options: Any
) -> AsyncIterator[Agent]:
    """Run an agent (real link, real runtime) as a task of the current loop until the block ends.

    ``options`` go to ``Agent`` (e.g. ``present_profiles``)."""
    async with Link(config) as link:
        prober = HealthProber(start_period_s=config.health_start_period_s)
        agent = Agent(
            config, runtime, link, public_key=keys.public, accelerators=[], prober=prober, **options
        )
        task = asyncio.create_task(agent.run(), name=f"agent {config.device_id}")
        try:
            yield agent
        finally:
            agent.stop()
            await asyncio.wait_for(task, WAIT_S)
            if close_runtime:
                await runtime.close()
