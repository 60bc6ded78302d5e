"""A real agent behind a bad link pulls a module image from a real registry, and never starts over.

The device (``edge-agent run``, process runtime, ``pull.method: resumable``) lives in its own
network namespace behind a veth pair shaped to 256 kbit/s, 200 ms round trip and 5 % loss
(``tc netem`` where the kernel has it, else ``tbf`` + nftables + a delaying relay). Mid-download
the link is cut for 10 s, and later the agent is SIGKILLed and started again. The pull must
resume each time (the agent's log says from which byte; the reports carry ``resumed_bytes``),
the module must come up from the unpacked image, and the bytes the host sent the device (the
veth's own counter) must stay well below what a restart from zero would have cost.
Skipped loudly where ``ip netns`` is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import uuid
from pathlib import Path

import yaml

from agent.runtime.blobs import BlobStore
from tests.integration.agent_rig import CloudSide, Keys, desired_state, fast_health, module_running
from tests.integration.fault_rig import AgentProcess
from tests.integration.module_image import DigitsBuild, digits_build
from tests.integration.netns import DelayRelay, DeviceLink, skip_unless_netns
from tests.integration.oci_push import Layer, layer, push_image, random_bytes
from tests.services import MosquittoBroker, RegistryServer, free_port

__all__ = ["digits_build"]  # the session fixture, imported so pytest finds it here

MODEL_PAD = 640_000
"""Incompressible bytes in the model layer: ~20 s at 256 kbit/s, long enough to cut it twice."""
RATE_KBIT, DELAY_MS, LOSS_PCT, CUT_S = 256, 200, 5, 10.0
DONE_S = 240.0


def _module_layers(digits: DigitsBuild) -> list[Layer]:
    folder = digits.folder
    base = layer({"module/module.json": (folder / "module.json").read_bytes()})
    model = layer(
        {
            "module/models/digits/1/model.onnx": (folder / "model.onnx").read_bytes(),
            "module/models/digits/1/pad.bin": random_bytes(MODEL_PAD),
        }
    )
    return [base, model]


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


async def _partial_reaches(path: Path, size: int, timeout: float, what: str, log: str) -> int:
    """Wait until the partial file ``path`` holds at least ``size`` bytes; returns its size."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        have = await asyncio.to_thread(_size, path)
        if have >= size:
            return have
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what}: the partial download never reached {size} bytes; agent log: {log}")


async def test_a_pull_over_a_bad_link_resumes_after_a_cut_and_an_agent_restart(
    tmp_path: Path, mosquitto: MosquittoBroker, registry: RegistryServer, digits_build: DigitsBuild
) -> None:
    skip_unless_netns()
    link = DeviceLink()
    registry_relay: DelayRelay | None = None
    agent: AgentProcess | None = None
    cloud: CloudSide | None = None
    try:
        link.relay = DelayRelay(link.host_ip, ("127.0.0.1", mosquitto.port))
        registry_relay = DelayRelay(link.host_ip, ("127.0.0.1", registry.port))
        how = link.shape(LOSS_PCT, DELAY_MS, RATE_KBIT)
        registry_relay.delay_s = DELAY_MS / 1000 / 2
        device_id = f"pull-{uuid.uuid4().hex[:8]}"
        address = f"{link.host_ip}:{registry_relay.port}"
        pushed = push_image(registry.address, f"edge13/{device_id}", "1", _module_layers(digits_build))
        image = f"{address}/edge13/{device_id}:1"
        big = pushed.layers[1]

        keys = Keys(tmp_path / "keys")
        state_dir = tmp_path / "state"
        config = {
            "device_id": device_id,
            "broker": {
                "url": f"mqtt://{link.host_ip}:{link.relay.port}",
                "reconnect_min_s": 1,
                "reconnect_max_s": 2,
            },
            "cloud_public_key": str(keys.public_path),
            "state_dir": str(state_dir),
            "runtime": "process",
            "pull_retry": {"base_s": 1, "max_s": 2},
            "heartbeat_s": 30,
            "pull": {"plain_http_registries": [address], "stall_timeout_s": 3, "progress_every_s": 2},
        }
        (tmp_path / "agent.yaml").write_text(yaml.safe_dump(config))
        agent = AgentProcess(tmp_path / "agent.yaml", tmp_path / "agent.log", link.prefix())
        cloud = CloudSide(mosquitto.port, device_id)
        port = free_port()
        module = {"image": image, "ports": [{"container": 5001, "host": port}], "health": fast_health()}
        sent_before, _ = link.host_bytes()
        agent.start()
        cloud.publish_desired(desired_state(device_id, 1, {"web": module}, key=keys.private))

        partial = BlobStore(state_dir / "blobs").partial(big.digest)
        size = len(big.blob)
        await _partial_reaches(partial, size * 35 // 100, DONE_S, "before the cut", agent.tail())
        link.cut()
        await asyncio.sleep(CUT_S)
        link.restore()
        cut_at = _size(partial)
        await _partial_reaches(
            partial, max(size * 65 // 100, cut_at + 1), DONE_S, "after the cut", agent.tail()
        )
        agent.kill()
        killed_at = _size(partial)
        agent.start()

        report = await cloud.report(module_running("web"), "web running from the pulled image", DONE_S)
        sent = link.host_bytes()[0] - sent_before
        log = (tmp_path / "agent.log").read_text()
        progress = [
            r.modules["web"].pull
            for r in cloud.reports
            if "web" in r.modules and r.modules["web"].pull is not None
        ]
    finally:
        if agent is not None:
            agent.stop()
        if cloud is not None:
            cloud.close()
        if registry_relay is not None:
            registry_relay.close()
        link.close()
        _stop_modules(tmp_path / "state")

    assert report.modules["web"].image == image
    assert BlobStore(state_dir / "blobs").has(big.digest)
    resumes = [line for line in log.splitlines() if "resuming" in line and big.digest[:19] in line]
    assert len(resumes) >= 2, (
        f"expected a resume after the cut and after the restart ({how}); log:\n{log[-3000:]}"
    )
    assert any(p.bytes_total == pushed.size and p.resumed_bytes > 0 for p in progress), progress
    # A restart from zero after the kill alone would have re-sent `killed_at` bytes on top of the image.
    ceiling = pushed.size + killed_at * 0.6
    assert sent < ceiling, (
        f"{sent} bytes sent to the device for a {pushed.size}-byte image ({how}); a restart from zero "
        f"would have cost about {pushed.size + killed_at}"
    )
    print(
        f"\nlink {how}: image {pushed.size} B, cut at {cut_at} B, agent killed at {killed_at} B, "
        f"{sent} B sent to the device ({sent / pushed.size:.2f}x)"
    )


def _stop_modules(state_dir: Path) -> None:
    """SIGKILL the module processes the agent left (their records name the pids)."""
    for record in state_dir.glob("modules/*/record.json"):
        pid = json.loads(record.read_text()).get("pid")
        if pid:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
