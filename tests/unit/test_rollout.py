"""Rollout waves: cumulative sizes, device split, and the advance/halt decision."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from cloud.fleet.status import Online, Reported, Status, device_status
from cloud.fleet.waves import evaluate, split_waves, wave_sizes

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("waves", "total", "expected"),
    [
        (["100%"], 10, [10]),
        ([1, "10%", "50%", "100%"], 100, [1, 10, 50, 100]),
        ([1, "10%", "50%", "100%"], 5, [1, 3, 5]),  # 10 % of 5 rounds up to 1: no new device, dropped
        ([1, "10%", "50%", "100%"], 1, [1]),
        ([2, 5], 20, [2, 5, 20]),  # the rest of the target is an implied final wave
        ([50], 3, [3]),
        (["12.5%"], 8, [1, 8]),
        (["100%"], 0, []),
    ],
)
def test_wave_sizes(waves: list[int | str], total: int, expected: list[int]) -> None:
    assert wave_sizes(waves, total) == expected


def test_split_is_by_device_id_and_covers_everyone_once() -> None:
    devices = [f"d{i:02d}" for i in range(10)][::-1]
    waves = split_waves(devices, [1, "50%"])
    assert waves == [["d00"], ["d01", "d02", "d03", "d04"], ["d05", "d06", "d07", "d08", "d09"]]


WAVES = [["a"], ["b", "c", "d", "e"], ["f", "g", "h", "i", "j"]]


@pytest.mark.parametrize(
    ("current", "statuses", "minutes", "kind", "reason"),
    [
        (0, {}, 0, "wait", "wave 1: 1 device(s) not settled yet"),
        (0, {"a": "applying"}, 0, "wait", "wave 1: 1 device(s) not settled yet"),
        (0, {"a": "healthy"}, 0, "advance", "wave 1 done; starting wave 2"),
        (0, {"a": "offline"}, 0, "advance", "wave 1 done; starting wave 2"),
        (0, {"a": "failed"}, 0, "halt", "1 of 1 released device(s) failed (100% > max_failure_ratio 25%)"),
        (0, {"a": "applying"}, 11, "halt", "1 of 1 released device(s) failed (100% > max_failure_ratio 25%)"),
        (
            1,
            {"a": "healthy", "b": "rejected", "c": "healthy", "d": "healthy", "e": "healthy"},
            0,
            "advance",
            "wave 2 done; starting wave 3",
        ),
        (
            1,
            {"a": "healthy", "b": "rolled back", "c": "failed", "d": "healthy", "e": "healthy"},
            0,
            "halt",
            "2 of 5 released device(s) failed (40% > max_failure_ratio 25%)",
        ),
        (
            1,
            {"a": "pending", "b": "healthy", "c": "healthy", "d": "healthy", "e": "healthy"},
            0,
            "advance",
            "wave 2 done; starting wave 3",
        ),
        (2, {d: "healthy" for d in "abcdefghij"}, 0, "complete", "all 3 wave(s) done"),
    ],
)
def test_decision(current: int, statuses: dict[str, Status], minutes: int, kind: str, reason: str) -> None:
    now = T0 + timedelta(minutes=minutes)
    decision = evaluate(
        WAVES,
        current,
        statuses,
        max_failure_ratio=0.25,
        wave_started_at=T0,
        now=now,
        deadline_s=600,
        heard_at=dict.fromkeys(statuses, now),  # every device just reported
    )
    assert (decision.kind, decision.reason) == (kind, reason)


def test_a_late_controller_waits_for_evidence_instead_of_failing_the_unheard() -> None:
    """Unknown is not failed: past the deadline, only a device that reported since it counts as failed."""
    late = T0 + timedelta(minutes=20)  # the controller starts 20 min after the wave, deadline 10 min
    common = {"max_failure_ratio": 0.0, "wave_started_at": T0, "now": late, "deadline_s": 600}
    quiet = evaluate(WAVES, 0, {"a": "applying"}, heard_at={"a": T0 + timedelta(seconds=5)}, **common)
    assert (quiet.kind, quiet.failed) == ("wait", 0)
    assert quiet.reason == "wave 1: 1 device(s) not settled yet (1 not heard from since the health deadline)"
    never = evaluate(WAVES, 0, {}, heard_at={}, **common)
    assert (never.kind, never.failed) == ("wait", 0)
    heard = evaluate(WAVES, 0, {"a": "applying"}, heard_at={"a": T0 + timedelta(minutes=11)}, **common)
    assert (heard.kind, heard.failed) == ("halt", 1)


SINCE = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("published", "reported", "online", "expected"),
    [
        (False, None, None, ("pending", "generation 3 not published yet (broker unreachable)")),
        (True, None, None, ("pending", "no report yet for generation 3")),
        (True, Reported(2, 2, "healthy"), None, ("pending", "device reports generation 2, desired is 3")),
        (
            True,
            Reported(2, 3, "healthy"),
            None,
            ("applying", "received generation 3, still running generation 2"),
        ),
        (True, Reported(3, 3, "applying"), Online(True, SINCE), ("applying", "")),
        (True, Reported(3, 3, "healthy"), None, ("healthy", "")),
        (True, Reported(3, 3, "failed", "det: exit 3"), None, ("failed", "det: exit 3")),
        (True, Reported(2, 3, "rolled_back", "det unhealthy"), None, ("rolled back", "det unhealthy")),
        (True, Reported(2, 3, "rejected", "signature: mismatch"), None, ("rejected", "signature: mismatch")),
        (
            True,
            Reported(3, 3, "healthy"),
            Online(False, SINCE),
            ("offline", "offline since 2026-03-01T12:00:00+00:00"),
        ),
    ],
)
def test_device_status(
    published: bool, reported: Reported | None, online: Online | None, expected: tuple[str, str]
) -> None:
    got = device_status(3, published, reported, online)
    assert (got.status, got.detail) == expected


def test_a_device_silent_for_three_heartbeats_is_stale_never_healthy() -> None:
    heard = SINCE
    report = Reported(3, 3, "healthy", heard_at=heard, heartbeat_s=10)
    fresh = device_status(3, True, report, Online(True, SINCE), SINCE + timedelta(seconds=29))
    assert fresh.status == "healthy"
    stale = device_status(3, True, report, Online(True, SINCE), SINCE + timedelta(seconds=31))
    assert stale.status == "stale"
    assert stale.detail == "no report for 31 s (3 heartbeats of 10 s); last said healthy"
    # A stale device holds its wave: its last word no longer stands either way.
    decision = evaluate(
        WAVES,
        0,
        {"a": "stale"},
        max_failure_ratio=0.0,
        wave_started_at=T0,
        now=T0,
        deadline_s=600,
        heard_at={},
    )
    assert (decision.kind, decision.failed) == ("wait", 0)
