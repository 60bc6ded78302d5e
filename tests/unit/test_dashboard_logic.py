"""The dashboard's pure parts: presence judging, filters, sessions, and the template helpers."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import pytest
from markupsafe import Markup

from cloud.dashboard.events import REFRESH_S, SharedRegions
from cloud.dashboard.queries import DeviceFilter, FilterError, Light
from cloud.dashboard.regions import LiveView, Regions
from cloud.dashboard.render import ago, environment, size, sparkline, status_class, wave_segments
from cloud.dashboard.session import SESSION_TTL_S, Sessions
from cloud.dashboard.watch import HISTORY, PresenceLog, Watcher
from cloud.fleet.device_state import judge_presence

NOW = datetime(2026, 1, 2, 12, 0, 0, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    ("online", "reported", "heartbeat", "expected"),
    [
        (None, None, None, "never seen"),
        (True, None, None, "online"),
        (False, None, None, "offline"),
        (True, NOW - timedelta(seconds=10), 60.0, "online"),
        (None, NOW - timedelta(seconds=10), 60.0, "online"),
        (True, NOW - timedelta(seconds=181), 60.0, "stale"),
        (True, NOW - timedelta(seconds=181), None, "stale"),  # the default heartbeat is 60 s
        (True, NOW - timedelta(seconds=20), 5.0, "stale"),
        (False, NOW - timedelta(seconds=1), 60.0, "offline"),
    ],
)
def test_judge_presence(
    online: bool | None, reported: datetime | None, heartbeat: float | None, expected: str
) -> None:
    presence, stale_after = judge_presence(online, reported, reported, heartbeat, NOW)
    assert presence == expected
    assert (stale_after is None) == (reported is None)


def test_presence_counts_from_arrival_when_the_device_clock_runs_ahead() -> None:
    arrived = NOW - timedelta(seconds=200)
    assert judge_presence(True, NOW + timedelta(hours=1), arrived, 60.0, NOW)[0] == "stale"


@pytest.mark.parametrize(
    ("status", "light", "expected"),
    [
        ("online", Light("a", "cpu", "online", "failed", NOW), True),
        ("healthy", Light("a", "cpu", "online", "healthy", NOW), True),
        ("healthy", Light("a", "cpu", "stale", "healthy", NOW), False),  # a stale report no longer stands
        ("failing", Light("a", "cpu", "online", "rolled_back", NOW), True),
        ("failing", Light("a", "cpu", "offline", "failed", NOW), False),
        ("never seen", Light("a", "cpu", "never seen", None, None), True),
    ],
)
def test_status_filter(status: str, light: Light, expected: bool) -> None:
    assert light.matches(status) is expected


def test_shown_status_is_the_presence_unless_online() -> None:
    assert Light("a", "cpu", "online", "healthy", NOW).shown_status == "healthy"
    assert Light("a", "cpu", "stale", "healthy", NOW).shown_status == "stale"
    assert Light("a", "cpu", "online", None, NOW).shown_status == "online"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"status": "asleep"}, "status 'asleep': expected one of online, offline"),
        ({"sort": "colour"}, "sort 'colour': expected one of id, profile, last_seen, status"),
        ({"tag": "site"}, "tag 'site': expected KEY=VALUE"),
        ({"tag": "=a"}, "expected KEY=VALUE"),
        ({"page": 0}, "expected page >= 1"),
        ({"per_page": 1000}, "1-200 rows"),
    ],
)
def test_filter_errors_name_what_is_accepted(fields: dict[str, object], message: str) -> None:
    with pytest.raises(FilterError, match=message.replace("(", r"\(")):
        DeviceFilter(**fields).check()  # type: ignore[arg-type]


def test_sessions_expire_and_are_extended_by_use() -> None:
    now = [1000.0]
    sessions = Sessions(clock=lambda: now[0])
    s = sessions.create()
    assert sessions.get(s.id) is s and s.csrf and s.csrf != s.id
    now[0] += SESSION_TTL_S - 1
    assert sessions.get(s.id) is s  # used: extended
    now[0] += SESSION_TTL_S - 1
    assert sessions.get(s.id) is s
    now[0] += SESSION_TTL_S + 1
    assert sessions.get(s.id) is None
    assert sessions.get(None) is None and sessions.get("forged") is None
    other = sessions.create()
    sessions.drop(other.id)
    assert sessions.get(other.id) is None


def test_login_csrf_is_bound_to_the_nonce_and_the_server() -> None:
    a, b = Sessions(), Sessions()
    assert a.login_csrf("n1") == a.login_csrf("n1")
    assert a.login_csrf("n1") != a.login_csrf("n2")
    assert a.login_csrf("n1") != b.login_csrf("n1")


def test_helpers() -> None:
    assert ago(None) == "never"
    assert ago(NOW - timedelta(seconds=5), NOW) == "5 s ago"
    assert ago(NOW - timedelta(minutes=3), NOW) == "3 min ago"
    assert ago(NOW - timedelta(days=2), NOW) == "2 d ago"
    assert ago(NOW + timedelta(seconds=5), NOW) == "just now"
    assert (size(None), size(512), size(2048), size(3 * 2**30)) == ("-", "512 B", "2.0 KiB", "3.0 GiB")
    assert status_class("healthy") == "ok" and status_class("rolled_back") == "bad"
    assert status_class(None) == status_class("something new") == "idle"


def test_sparkline_scales_into_the_box() -> None:
    points = sparkline([(0.0, 10, 0), (5.0, 10, 5), (10.0, 10, 10)], width=100, height=20)
    assert points == "0.0,18.0 50.0,10.0 100.0,2.0"
    assert sparkline([]) == ""


def test_wave_segments_cover_the_wave() -> None:
    segments = wave_segments({"failed": 1, "healthy": 3}, 4, width=100)
    assert [(s["cls"], s["w"]) for s in segments] == [("ok", 75.0), ("bad", 25.0)]
    assert segments[1]["x"] == 75.0
    assert wave_segments({}, 0) == []


def test_templates_escape_what_devices_write() -> None:
    html = environment().from_string("<p>{{ reason }}</p>").render(reason='<img src=x onerror="alert(1)">')
    assert html == "<p>&lt;img src=x onerror=&#34;alert(1)&#34;&gt;</p>"


async def test_streams_of_one_view_share_one_computation_per_store_version() -> None:
    now = [0.0]
    shared = SharedRegions(clock=lambda: now[0])
    calls: list[int] = []

    async def compute() -> Regions:
        calls.append(1)
        await asyncio.sleep(0.01)
        return {"ov-counts": Markup(f"<p>{len(calls)}</p>")}

    key = (LiveView("overview"), "")
    first = await asyncio.gather(*(shared.get(key, 1, compute) for _ in range(5)))
    assert len(calls) == 1 and all(r == first[0] for r in first)
    await shared.get(key, 2, compute)  # the store changed
    assert len(calls) == 2
    now[0] += REFRESH_S  # time passes: presence may have changed without a store change
    await shared.get(key, 2, compute)
    assert len(calls) == 3
    await shared.get((LiveView("devices", ids=("a",)), ""), 2, compute)
    assert len(calls) == 4


def test_presence_log_keeps_the_changes_it_sees() -> None:
    log = PresenceLog()
    t = [NOW + timedelta(minutes=i) for i in range(4)]
    log.update([("a", True, t[0]), ("b", True, t[0])])
    assert log.history("a") == [(t[0], True)] and log.history("nope") == []
    log.update([("a", True, t[0]), ("b", True, t[0])])  # nothing new: nothing noted
    assert log.changes == {}
    log.update([("a", False, t[1])])
    log.update([("a", True, t[2])])
    assert log.history("a") == [(t[2], True), (t[1], False), (t[0], True)]
    assert log.history("b") == [(t[0], True)]


def test_healthy_history_is_replaced_whole_never_changed_under_a_reader() -> None:
    now = [1000.0]
    watcher = Watcher(None, clock=lambda: now[0])  # type: ignore[arg-type]  # sampling reads no store
    watcher._sample({"vision": (3, 1), "old": (1, 1)})
    seen = watcher.history  # what a page in a worker thread may be iterating
    before = dict(seen)
    now[0] += 5
    watcher._sample({"vision": (3, 2)})
    assert seen == before  # the reader's dict and its samples are untouched
    assert watcher.history == {"vision": ((1000.0, 3, 1), (1005.0, 3, 2))}  # "old" is gone
    now[0] += 5
    watcher._sample({"vision": (3, 2)})  # unchanged counts add no sample
    assert len(watcher.history["vision"]) == 2
    for i in range(HISTORY + 10):
        watcher._sample({"vision": (3, i)})
    assert len(watcher.history["vision"]) == HISTORY
