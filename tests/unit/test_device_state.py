"""What the operator sees of a device: presence, staleness and the latest report; and through the CLI."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cloud.cli import main
from cloud.config import resolve_settings
from cloud.devices import DeviceManager
from cloud.fleet.device_state import device_state
from cloud.store.fleet import OnlineRecord, ReportedRecord
from modules.contract import ModuleHealth, ModuleStatus, PullProgress, Rejection, ReportedState

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)


def report(at: datetime = T0, heartbeat_s: float | None = 10, **kw: object) -> ReportedState:
    fields: dict[str, object] = {
        "device_id": "cam-1",
        "generation_applied": 4,
        "deployment_status": "healthy",
        "agent_version": "1.2.3",
        "reported_at": at,
        "heartbeat_s": heartbeat_s,
        "modules": {
            "det": ModuleStatus(
                runtime_status="running",
                restart_count=2,
                execution_provider="CPUExecutionProvider",
                precision="f32",
                image_digest="sha256:" + "a" * 64,
                health=ModuleHealth(live=True, ready=True, latency_ms=1.5),
            )
        },
    }
    return ReportedState.model_validate(fields | kw)


def test_a_fresh_report_from_an_online_device_stands() -> None:
    state = device_state(report(), T0, (True, T0, T0), T0 + timedelta(seconds=29), (4, "vision"))
    assert (state.presence, state.deployment_status, state.modules_healthy) == ("online", "healthy", 1)
    assert (state.generation_applied, state.generation_desired, state.deployment) == (4, 4, "vision")
    assert state.stale_after == T0 + timedelta(seconds=30)  # 3 heartbeats of 10 s


def test_three_missed_heartbeats_make_a_device_stale_and_never_healthy() -> None:
    state = device_state(report(), T0, (True, T0, T0), T0 + timedelta(seconds=31))
    assert state.presence == "stale" and state.deployment_status == "stale"
    assert state.modules_healthy == 0
    assert (
        state.reason is not None
        and "no report for 31 s" in state.reason
        and "last said healthy" in state.reason
    )


def test_a_device_clock_ahead_does_not_keep_it_fresh() -> None:
    ahead = report(at=T0 + timedelta(hours=1))  # the device's clock is an hour fast
    assert device_state(ahead, T0, (True, T0, T0), T0 + timedelta(seconds=31)).presence == "stale"


def test_without_a_heartbeat_in_the_report_the_agent_default_applies() -> None:
    state = device_state(report(heartbeat_s=None), T0, None, T0 + timedelta(seconds=179))
    assert state.presence == "online" and state.stale_after == T0 + timedelta(seconds=180)


def test_offline_wins_and_never_seen_devices_say_so() -> None:
    offline = device_state(report(), T0, (False, T0 + timedelta(seconds=5), T0), T0 + timedelta(seconds=6))
    assert offline.presence == "offline" and offline.since == T0 + timedelta(seconds=5)
    assert device_state(None, None, None, T0).presence == "never seen"


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "data"
    monkeypatch.setenv("EDGE_DATA_DIR", str(d))
    monkeypatch.delenv("EDGE_DB_URL", raising=False)
    return d


def _store(data_dir: Path, state: ReportedState, online: bool | None = None) -> None:
    """``state`` as cam-1's latest report in the cloud's store (and an online message)."""
    now = state.reported_at
    manager = DeviceManager.open(resolve_settings(data_dir))
    try:
        with manager.db.transaction() as s:
            s.add(
                ReportedRecord(
                    device_id=state.device_id,
                    generation_applied=state.generation_applied,
                    generation_received=state.generation_applied,
                    deployment_status=state.deployment_status,
                    payload=state.model_dump_json(),
                    reported_at=now,
                    received_at=now,
                )
            )
            if online is not None:
                s.add(
                    OnlineRecord(
                        device_id=state.device_id, online=online, since=now, received_at=now, ordering=1
                    )
                )
    finally:
        manager.close()


def test_device_show_and_list_print_what_the_store_knows(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["device", "add", "cam-1"]) == 0
    now = datetime.now(timezone.utc)
    rejection = Rejection(code="not_json", reason="not JSON: line 1", at=now)
    _store(data_dir, report(at=now, last_rejection=rejection), online=True)
    capsys.readouterr()
    assert main(["device", "show", "cam-1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["state"]
    assert (shown["presence"], shown["deployment_status"], shown["agent_version"]) == (
        "online",
        "healthy",
        "1.2.3",
    )
    assert shown["last_rejection"]["code"] == "not_json"
    module = shown["modules"]["det"]
    assert (module["restart_count"], module["precision"], module["health"]["latency_ms"]) == (2, "f32", 1.5)

    assert main(["device", "show", "cam-1"]) == 0
    text = capsys.readouterr().out
    expected_lines = ("presence:   online since", "status:     healthy", "rejected:", "not_json")
    expected_module = (
        "det: running",
        "restarts 2",
        "provider CPUExecutionProvider",
        "precision f32",
        "1.5 ms",
    )
    for expected in expected_lines + expected_module:
        assert expected in text, (expected, text)
    assert main(["device", "list"]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:2] == ["cam-1", "online"] and "1/1" in row


def test_device_show_prints_pull_progress(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["device", "add", "cam-1"]) == 0
    now = datetime.now(timezone.utc)
    pulling = ModuleStatus(
        runtime_status="running",
        image="localhost:5000/det:1",
        message="runs localhost:5000/det:1 while pulling localhost:5000/det:2",
        pull=PullProgress(
            image="localhost:5000/det:2",
            bytes_done=3_000_000,
            bytes_total=12_000_000,
            bytes_per_s=31_000.0,
            eta_s=290.0,
            resumed_bytes=1_500_000,
        ),
    )
    waiting = ModuleStatus(
        runtime_status="pulling",
        image="localhost:5000/cls:1",
        pull=PullProgress(
            image="localhost:5000/cls:1", waiting_until=datetime(2026, 12, 2, 1, 0, tzinfo=timezone.utc)
        ),
    )
    _store(data_dir, report(at=now, deployment_status="applying", modules={"det": pulling, "cls": waiting}))
    capsys.readouterr()
    assert main(["device", "show", "cam-1"]) == 0
    text = capsys.readouterr().out
    for expected in (
        "pull 3.0 MB of 12.0 MB (25%), 31.0 kB/s, ETA 5 min, 1.5 MB kept across link drops",
        "pull of localhost:5000/cls:1 waits for the update window (opens 2026-12-02 01:00 UTC)",
    ):
        assert expected in text, (expected, text)
    assert main(["device", "show", "cam-1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["state"]["modules"]["det"]["pull"]
    assert (shown["bytes_done"], shown["bytes_total"], shown["eta_s"]) == (3_000_000, 12_000_000, 290.0)


def test_a_report_without_pull_fields_stays_valid() -> None:
    old = report().model_dump(mode="json")
    del old["modules"]["det"]["pull"]
    assert ReportedState.model_validate(old).modules["det"].pull is None
