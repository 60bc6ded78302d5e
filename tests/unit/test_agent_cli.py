"""``edge-agent check-config`` and ``status`` on files in a temporary folder (no agent, no broker)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from agent.agent import STATE_FILE
from agent.cli import build_runtime, main
from agent.config import load_agent_config
from agent.reporting import REPORT_FILE
from agent.runtime.process import ProcessRuntime
from agent.state import AgentState, StateStore
from modules.contract import DesiredState, ModuleStatus, PullProgress, ReportedState, utcnow
from modules.signing import generate_keypair


def write_config(folder: Path, **extra: str) -> Path:
    (folder / "cloud.pub").write_bytes(generate_keypair()[1])
    lines = {
        "device_id": "pump-17",
        "broker": "{url: 'mqtt://127.0.0.1:1883'}",
        "cloud_public_key": "cloud.pub",
        "state_dir": "state",
        "runtime": "process",
        **extra,
    }
    path = folder / "agent.yaml"
    path.write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
    return path


def test_check_config_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, metrics_port="9464")
    assert main(["check-config", "--config", str(config), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["ok"] and shown["metrics"] == "http://127.0.0.1:9464/metrics"
    assert shown["state_dir"] == str(tmp_path / "state")
    assert shown["images_dir"] == str(tmp_path / "state" / "images")
    assert shown["health_start_period_s"] == 120.0


def test_metrics_port_0_is_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, metrics_port="0")
    assert main(["check-config", "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] is None


async def test_process_runtime_finds_modules_in_images_dir(tmp_path: Path) -> None:
    config = load_agent_config(write_config(tmp_path, images_dir="unpacked"))
    runtime = build_runtime(config)
    assert isinstance(runtime, ProcessRuntime) and runtime.images_dir == tmp_path / "unpacked"
    await runtime.close()
    override = build_runtime(config, tmp_path / "elsewhere")
    assert isinstance(override, ProcessRuntime) and override.images_dir == tmp_path / "elsewhere"
    await override.close()


def test_check_config_names_the_bad_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, heartbeat_s="-1")
    with pytest.raises(SystemExit) as exit_info:
        main(["check-config", "--config", str(config)])
    assert exit_info.value.code == 2
    assert "heartbeat_s" in capsys.readouterr().err


def test_check_config_bad_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    (tmp_path / "cloud.pub").write_text("not a key")
    assert main(["check-config", "--config", str(config)]) == 2
    assert "cloud.pub" in capsys.readouterr().err


def test_status_reads_the_local_state(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    assert main(["status", "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["generation_applied"] is None
    now = utcnow()
    desired = DesiredState(
        device_id="pump-17", generation=3, issued_at=now, expires_at=now + timedelta(hours=1)
    )
    StateStore(tmp_path / "state" / STATE_FILE).save(AgentState().applied(desired, now).became_healthy())
    assert main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "applied generation: 3 (healthy)" in out and "last known good: 3" in out


def test_status_shows_pull_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path)
    progress = PullProgress(image="reg:5000/web:2", bytes_done=2_500_000, bytes_total=10_000_000, eta_s=60.0)
    report = ReportedState(
        device_id="pump-17",
        deployment_status="applying",
        agent_version="test",
        modules={"web": ModuleStatus(runtime_status="running", image="reg:5000/web:1", pull=progress)},
    )
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / REPORT_FILE).write_text(report.model_dump_json())
    assert main(["status", "--config", str(config)]) == 0
    assert "    pull 2.5 MB of 10.0 MB (25%), ETA 60 s" in capsys.readouterr().out
