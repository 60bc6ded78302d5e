"""Layered deployments end to end: signed states on a real Mosquitto, a layer's own waves, halt and revert.

Every wait is for a condition with a generous timeout; nothing asserts on timing.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from cloud.fleet.ingest import Ingestor
from cloud.fleet.service import ApplyError, Fleet
from tests.integration.test_fleet_publish import (
    Recorder,
    add_cpu_device,
    endpoint,
    fleet,
    generations,
    manifest,
    publish_reports,
    report,
)
from tests.integration.test_ingest import until
from tests.services import MosquittoFactory

pytestmark = pytest.mark.integration
__all__ = ["fleet"]


def status_of(fleet: Fleet, device: str) -> str:
    """The device's status in the layer's rollout."""
    return next(d.status for d in fleet.progress("debug").devices if d.device == device)


DEBUG = {"detector": {"env": {"LOG_LEVEL": "debug"}}}


async def test_a_layer_rolls_out_in_its_own_waves_on_top_and_reverts_to_the_base(
    fleet: Fleet, mosquitto_factory: MosquittoFactory
) -> None:
    broker = mosquitto_factory()
    ep = endpoint(broker)
    fleet.apply(manifest(), endpoint=ep)  # base "vision" on cam-1..3 (site a)
    async with Ingestor(fleet.db, ep, flush_interval_s=0.05) as ingest:
        publish_reports(broker, {d: report(d, 1, "healthy") for d in ("cam-1", "cam-2", "cam-3")})
        assert await until(lambda: ingest.stats.written >= 3)
    assert fleet.advance_rollouts(endpoint=ep) == ["vision: all 1 wave(s) done"]
    layer = manifest(
        "debug",
        layered=True,
        priority=5,
        modules={"sidecar": {"images": {"cpu": "reg.local/side:1"}}},
        overrides=DEBUG,
        rollout={"waves": [1, "100%"], "max_failure_ratio": 0.0, "revert_on_halt": True},
    )
    applied = fleet.apply(layer, endpoint=ep)
    assert (applied.selected, applied.winning, applied.waves) == (3, 3, [1, 2])
    assert [(p.module, p.origin, p.devices) for p in applied.placements] == [
        ("detector", "from 'vision' (env.LOG_LEVEL by 'debug')", ["cam-1", "cam-2", "cam-3"]),
        ("sidecar", "from 'debug'", ["cam-1", "cam-2", "cam-3"]),
    ]
    assert generations(fleet) == {"cam-1": 2, "cam-2": 1, "cam-3": 1}
    recorder = Recorder(broker)
    try:
        first = recorder.wait_for({"cam-1"}, generation=2)["cam-1"]
        assert first.deployment == "vision"
        assert first.modules["detector"].env == {"LOG_LEVEL": "debug"}
        assert first.modules["detector"].image == "reg.local/det:1-cpu"
        assert sorted(first.modules) == ["detector", "sidecar"]
        async with Ingestor(fleet.db, ep, flush_interval_s=0.05):
            publish_reports(broker, {"cam-1": report("cam-1", 2, "healthy")})
            assert await until(lambda: status_of(fleet, "cam-1") == "healthy")
            assert fleet.advance_rollouts(endpoint=ep) == ["debug: wave 1 done; starting wave 2"]
            second = recorder.wait_for({"cam-2", "cam-3"}, generation=2)
            assert all(s.modules["detector"].env == {"LOG_LEVEL": "debug"} for s in second.values())
            assert fleet.list_deployments()[0].layered
            publish_reports(broker, {"cam-2": report("cam-2", 2, "failed")})
            assert await until(lambda: status_of(fleet, "cam-2") == "failed")
            moved = fleet.advance_rollouts(endpoint=ep)
        assert moved[0].startswith("debug: halted and reverted the released devices")
        back = recorder.wait_for({"cam-1", "cam-2", "cam-3"}, generation=3)
    finally:
        recorder.close()
    for state in back.values():
        assert sorted(state.modules) == ["detector"] and state.modules["detector"].env == {}
    assert {d.device: d.status for d in fleet.progress("debug").devices} == {
        "cam-1": "reverted",
        "cam-2": "reverted",
        "cam-3": "reverted",
    }


def test_a_layer_that_cannot_apply_to_a_selected_device_is_refused_naming_it(fleet: Fleet) -> None:
    fleet.apply(manifest())
    fleet.apply(
        manifest("gateway", target={"tags": {"site": "b"}}, modules={"gw": {"images": {"cpu": "r/gw:1"}}})
    )
    before = generations(fleet)
    everywhere = manifest("debug", layered=True, target={"profile": "cpu"}, modules={}, overrides=DEBUG)
    with pytest.raises(ApplyError) as err:
        fleet.apply(everywhere)
    assert str(err.value) == (
        "deployment 'debug': layer left out: overrides module 'detector', which no deployment below it "
        "gives this device (1 device(s): gw-1)"
    )
    assert generations(fleet) == before


def test_cli_apply_lists_origins_and_explain_shows_provenance(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cloud.cli import main

    data = tmp_path / "data"
    add_cpu_device(data, "cam-1", site="lab")
    base = tmp_path / "base.yaml"
    base.write_text(
        "name: vision\ntarget: {tags: {site: lab}}\nmodules:\n  digits:\n    images: {cpu: r/d:1}\n"
    )
    layer = Path(__file__).resolve().parents[2] / "examples" / "layer.yaml"
    common = ["--data-dir", str(data), "--broker-url", "mqtt://127.0.0.1:9"]
    assert main(["deploy", "apply", "-f", str(base), "--dry-run", *common]) == 0
    assert main(["deploy", "apply", "-f", str(base), *common]) == 0
    capsys.readouterr()
    assert main(["deploy", "apply", "-f", str(layer), *common]) == 0
    out = capsys.readouterr().out
    assert "  digits from 'vision' (env.LOG_LEVEL by 'lab-debug') on 1 device(s): cam-1" in out
    assert "  exporter from 'lab-debug' on 1 device(s): cam-1" in out
    assert main(["deploy", "explain", "cam-1", "--data-dir", str(data)]) == 0
    out = capsys.readouterr().out
    assert "  vision  priority 0" in out and ": wins" in out
    assert "  lab-debug  priority 20" in out and ": layer: applies on top" in out
    assert "  digits  from 'vision' (env.LOG_LEVEL by 'lab-debug'): r/d:1 (profile cpu" in out
    assert "  exporter  from 'lab-debug': 127.0.0.1:5000/edge/exporter:1" in out
