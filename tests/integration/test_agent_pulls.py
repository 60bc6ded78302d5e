"""The real agent's pull settings end to end: ``edge-agent run`` (process runtime) against a real
registry and Mosquitto, with the cloud's view through MQTT.

Outside its update window the agent fetches nothing and says in its report when the window opens;
the old module keeps serving meanwhile.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import yaml

from agent.runtime.blobs import BlobStore
from modules.contract import ReportedState
from tests.integration.agent_rig import CloudSide, Keys, desired_state, fast_health
from tests.integration.fault_rig import AgentProcess
from tests.integration.oci_push import layer, push_image
from tests.services import MosquittoBroker, RegistryServer, free_port


async def test_outside_the_update_window_nothing_is_fetched_and_the_report_says_until_when(
    tmp_path: Path, mosquitto: MosquittoBroker, registry: RegistryServer
) -> None:
    now = datetime.now(timezone.utc)
    opens = (now + timedelta(hours=2)).replace(second=0, microsecond=0)
    closes = opens + timedelta(hours=1)
    window = f"{opens:%H:%M}-{closes:%H:%M}"
    device_id = f"window-{uuid.uuid4().hex[:8]}"
    pushed = push_image(registry.address, f"edge13/{device_id}", "1", [layer({"module/module.json": b"{}"})])
    keys = Keys(tmp_path / "keys")
    state_dir = tmp_path / "state"
    config = {
        "device_id": device_id,
        "broker": {"url": f"mqtt://127.0.0.1:{mosquitto.port}", "reconnect_min_s": 1, "reconnect_max_s": 2},
        "cloud_public_key": str(keys.public_path),
        "state_dir": str(state_dir),
        "runtime": "process",
        "heartbeat_s": 5,
        "pull": {"window": window},
    }
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))
    agent = AgentProcess(tmp_path / "agent.yaml", tmp_path / "agent.log")
    cloud = CloudSide(mosquitto.port, device_id)
    try:
        agent.start()
        module = {
            "image": pushed.reference,
            "ports": [{"container": 5001, "host": free_port()}],
            "health": fast_health(),
        }
        cloud.publish_desired(desired_state(device_id, 1, {"web": module}, key=keys.private))

        def waiting(r: ReportedState) -> bool:
            m = r.modules.get("web")
            return bool(m and m.pull and m.pull.waiting_until is not None)

        report = await cloud.report(waiting, "web waiting for the update window")
    finally:
        agent.stop()
        cloud.close()
    web = report.modules["web"]
    assert web.runtime_status == "pulling"
    assert web.pull is not None and web.pull.waiting_until == opens
    assert "waits for the update window" in web.pull.describe()
    assert BlobStore(state_dir / "blobs").digests() == set()  # not a byte fetched
    assert f"waits for the update window {window} UTC" in (tmp_path / "agent.log").read_text()
