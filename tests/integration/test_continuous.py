"""Continuous deployment: a module that follows a model gets every new version, by CLI and by REST.

Docker Engine, the image registry, the cpu base image and Mosquitto are real; skipped loudly
without them. Every wait is for a condition with a generous timeout.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from edgemqtt.endpoint import Endpoint
from tests.integration.test_api import _start, upload
from tests.integration.test_base_image import cpu_base_or_skip
from tests.integration.test_fleet_publish import Recorder, add_cpu_device
from tests.integration.test_packaging import train_digits
from tests.services import MosquittoFactory

pytestmark = pytest.mark.integration
PUBLISHING = {"register", "apply", "set-model"}


async def test_a_following_module_gets_each_new_version_until_it_is_pinned(
    tmp_path: Path,
    mosquitto_factory: MosquittoFactory,
    registry: Any,
    docker_client: Any,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cloud.cli import main

    await asyncio.to_thread(cpu_base_or_skip, registry, docker_client)
    data = tmp_path / "data"
    broker = mosquitto_factory()
    broker_url = ["--broker-url", f"mqtt://127.0.0.1:{broker.port}"]

    def cli(*argv: str) -> str:
        code = main([*argv, "--data-dir", str(data), *(broker_url if argv[1] in PUBLISHING else [])])
        out, err = capsys.readouterr()
        assert code == 0, err
        return out

    models = [await asyncio.to_thread(train_digits, tmp_path / f"v{i}", (16 + i,), i) for i in range(1, 5)]
    cli("model", "register", str(models[0] / "model.onnx"), "--name", "digits")
    add_cpu_device(data, "cam-1")
    (tmp_path / "vision.yaml").write_text(
        "name: vision\ntarget: {device_ids: [cam-1]}\n"
        "modules:\n  digits:\n    images: {cpu: reg.local/digits:0}\n"
    )
    cli("deploy", "apply", "-f", str(tmp_path / "vision.yaml"))
    out = await asyncio.to_thread(
        cli, "deploy", "set-model", "vision", "digits", "digits", "--follow", "--registry", registry.address
    )
    assert "vision/digits follows digits: each new version registered rolls out" in out

    out = await asyncio.to_thread(cli, "model", "register", str(models[1] / "model.onnx"), "--name", "digits")
    assert "registered digits:2" in out
    assert "vision/digits follows digits: rolled out digits:2, 1 new desired state(s), 1 published" in out
    recorder = Recorder(broker)
    try:
        state = recorder.wait_for({"cam-1"}, generation=3)["cam-1"]
    finally:
        recorder.close()
    second = state.modules["digits"].image
    assert second.startswith(f"{registry.address}/digits@sha256:")
    shown = json.loads(cli("deploy", "show", "vision", "--json"))
    assert (shown["models"], shown["follows"]) == (["digits:2"], {"digits": "digits"})
    assert shown["manifest"]["modules"]["digits"]["images"] == {"cpu": second}
    history = json.loads(cli("deploy", "history", "vision", "--json"))
    assert history[-1]["source"] == "follows digits:2"

    # The same over REST: the answer names the follow, the rollout runs in the background.
    endpoint = Endpoint.parse(f"mqtt://127.0.0.1:{broker.port}")
    async for api in _start(tmp_path, endpoint):
        body = await upload(api, "digits", (models[2] / "model.onnx").read_bytes())
        assert (body["version"], body["follows"]) == (3, ["vision/digits"])
        for _ in range(600):
            shown = await api.call("GET", "/deployments/vision", 200)
            if shown["models"] == ["digits:3"]:
                break
            await asyncio.sleep(0.5)
        assert shown["models"] == ["digits:3"], "the REST register did not roll digits:3 out"
        assert shown["manifest"]["modules"]["digits"]["images"]["cpu"] != second

        # Pinned: no longer following, a new version rolls out nowhere.
        assert "no longer follows digits" in cli("deploy", "unfollow", "vision", "digits")
        body = await upload(api, "digits", (models[3] / "model.onnx").read_bytes())
        assert (body["version"], body["follows"]) == (4, [])
        assert not api.services.background
        shown = await api.call("GET", "/deployments/vision", 200)
        assert shown["models"] == ["digits:3"]

    # Re-applying the original file would revert the model: apply says so before it changes anything.
    code = main(
        ["deploy", "apply", "-f", str(tmp_path / "vision.yaml"), "--dry-run", "--data-dir", str(data)]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "-      cpu: " in out and "+      cpu: reg.local/digits:0" in out
    assert (
        "note: this apply replaces module digits's images, which a model rollout set (it runs digits:3)"
        in err
    )
