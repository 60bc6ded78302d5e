"""What the reporter sends: full reports on news, small heartbeats otherwise (pure logic, memory link)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.config import AgentConfig, BrokerConfig
from agent.metrics import AgentMetrics
from agent.reporting import Reporter, system_moved
from modules.contract import ClientConflict, Heartbeat, ReportedState, SystemMetrics

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
DEVICE = "dev-1"


def metrics(**kw: float | bool | None) -> SystemMetrics:
    base: dict[str, float | bool | None] = {
        "cpu_percent": 10.0,
        "memory_used_mb": 400.0,
        "memory_total_mb": 1000.0,
        "disk_free_mb": 5000.0,
        "temperature_c": 50.0,
        "disk_min_free_mb": 200.0,
    }
    return SystemMetrics.model_validate({**base, **kw})


@pytest.mark.parametrize(
    ("after", "news"),
    [
        (metrics(cpu_percent=99.0), None),  # CPU swings: only the hourly refresh carries it
        (metrics(memory_used_mb=550.0), None),
        (metrics(memory_used_mb=600.0), "memory used 400 -> 600 MB"),
        (metrics(disk_free_mb=4100.0), None),
        (metrics(disk_free_mb=3900.0), "free disk 5000 -> 3900 MB"),
        (metrics(disk_free_mb=150.0, disk_low=True), "disk low"),
        (metrics(temperature_c=55.0), None),
        (metrics(temperature_c=61.0), "temperature 50.0 -> 61.0 C"),
        (metrics(temperature_c=None), "temperature 50.0 -> None C"),
    ],
)
def test_system_metrics_are_news_only_when_they_move_meaningfully(
    after: SystemMetrics, news: str | None
) -> None:
    assert system_moved(metrics(), after) == news


def test_small_disks_need_a_step_of_100_mb_and_recovery_is_news() -> None:
    assert system_moved(metrics(disk_free_mb=300.0), metrics(disk_free_mb=220.0)) is None
    assert system_moved(metrics(disk_free_mb=300.0), metrics(disk_free_mb=199.0)) == "free disk 300 -> 199 MB"
    low = metrics(disk_free_mb=190.0, disk_low=True)
    assert system_moved(low, metrics(disk_free_mb=210.0)) == "disk no longer low"
    assert system_moved(None, metrics()) == "system metrics appeared or went away"
    assert system_moved(None, None) is None


def test_disk_warning_names_free_and_needed_space() -> None:
    assert metrics().disk_warning() is None
    warning = metrics(disk_free_mb=150.0, disk_low=True).disk_warning()
    assert warning is not None and "150 MB free" in warning and "200 MB" in warning


def test_heartbeat_is_small_and_checked() -> None:
    beat = Heartbeat(device_id=DEVICE, generation_applied=3, report_at=T0, heartbeat_s=60, reported_at=T0)
    assert len(beat.model_dump_json()) < 200
    assert Heartbeat.model_validate_json(beat.model_dump_json()) == beat
    with pytest.raises(ValidationError, match="heartbeat_s"):
        Heartbeat(device_id=DEVICE, report_at=T0, heartbeat_s=0)
    with pytest.raises(ValidationError, match="report_at"):
        Heartbeat.model_validate({"device_id": DEVICE, "heartbeat_s": 60})


class Link:
    def __init__(self) -> None:
        self.client_conflict: ClientConflict | None = None
        self.sessions = 1
        self.sent: list[ReportedState | Heartbeat] = []

    async def publish_reported(self, state: ReportedState) -> None:
        self.sent.append(state)

    async def publish_heartbeat(self, heartbeat: Heartbeat) -> None:
        self.sent.append(heartbeat)


class Sampler:
    def __init__(self) -> None:
        self.now = metrics()

    def sample(self) -> SystemMetrics:
        return self.now


@pytest.fixture
def parts(tmp_path: Path) -> tuple[Reporter, Link, Sampler]:
    config = AgentConfig(
        device_id=DEVICE,
        broker=BrokerConfig(url="mqtt://127.0.0.1:1883"),
        cloud_public_key=tmp_path / "cloud.pub",
        state_dir=tmp_path / "state",
        heartbeat_s=60,
    )
    link, sampler = Link(), Sampler()
    reporter = Reporter(config, link, sampler, AgentMetrics(), local_copy=False)  # type: ignore[arg-type]
    return reporter, link, sampler


def report(at: datetime, status: str = "healthy") -> ReportedState:
    return ReportedState.model_validate(
        {"device_id": DEVICE, "deployment_status": status, "agent_version": "t", "reported_at": at}
    )


async def test_an_idle_agent_sends_heartbeats_and_an_hourly_full_report(
    parts: tuple[Reporter, Link, Sampler],
) -> None:
    reporter, link, sampler = parts
    defaults = reporter.config.model_copy(
        update={"heartbeat_s": AgentConfig.model_fields["heartbeat_s"].default}
    )
    assert (defaults.heartbeat_s, defaults.report_refresh_s, defaults.broker.keepalive_s) == (90, 3600, 135)
    assert defaults.broker.keepalive_s > defaults.heartbeat_s, "heartbeats keep the link alive: no pings"
    assert await reporter.publish(report(T0), T0, None) == "report"
    assert (
        await reporter.publish(report(T0 + timedelta(seconds=30)), T0 + timedelta(seconds=30), None) is None
    )
    sampler.now = metrics(cpu_percent=90.0)
    sent = []
    for minute in range(1, 60):
        at = T0 + timedelta(minutes=minute)
        sent.append(await reporter.publish(report(at), at, None))
    assert sent == ["heartbeat"] * 59
    beat = link.sent[-1]
    assert isinstance(beat, Heartbeat) and (beat.report_at, beat.heartbeat_s) == (T0, 60)
    hour = T0 + timedelta(minutes=60)
    assert await reporter.publish(report(hour), hour, None) == "report"
    refreshed = link.sent[-1]
    assert isinstance(refreshed, ReportedState) and refreshed.system == metrics(cpu_percent=90.0)


async def test_news_goes_out_at_once_and_disk_low_by_the_next_heartbeat(
    parts: tuple[Reporter, Link, Sampler],
) -> None:
    reporter, link, sampler = parts
    await reporter.publish(report(T0), T0, None)
    soon = T0 + timedelta(seconds=5)
    assert await reporter.publish(report(soon, "failed"), soon, None) == "report"
    later = soon + timedelta(seconds=5)
    link.sessions += 1  # a new session: what was queued offline is old news
    assert await reporter.publish(report(later, "failed"), later, None) == "report"
    sampler.now = metrics(disk_free_mb=150.0, disk_low=True)
    quiet = later + timedelta(seconds=5)
    assert await reporter.publish(report(quiet, "failed"), quiet, None) is None, "sampled with heartbeats"
    due = later + timedelta(seconds=60)
    assert await reporter.publish(report(due, "failed"), due, None) == "report"
    last = link.sent[-1]
    assert isinstance(last, ReportedState) and last.system is not None and last.system.disk_low
    assert [type(m).__name__ for m in link.sent] == ["ReportedState"] * 4
