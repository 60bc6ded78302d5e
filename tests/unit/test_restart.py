"""Restart policy, back-off schedule and restart-count reset."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from agent.observed import ObservedModule
from agent.restart import (
    BackoffConfig,
    DontRestart,
    RestartBook,
    RestartNow,
    RestartPolicyConfig,
    WaitUntil,
    backoff_delay,
    record_restart,
    refresh_book,
    should_restart,
)
from modules.contract import ModuleHealth

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
CFG = RestartPolicyConfig()


def observed(status: str = "running", **kw: Any) -> ObservedModule:
    return ObservedModule(name="web", image="localhost:5000/web:1", status=status, **kw)  # type: ignore[arg-type]


def exited(code: int | None = 1, ago_s: float = 3600) -> ObservedModule:
    return observed("exited", exit_code=code, finished_at=NOW - timedelta(seconds=ago_s))


def sick(failures: int = 3) -> ObservedModule:
    health = ModuleHealth(live=False, ready=False, error="timed out")
    return observed(started_at=NOW - timedelta(hours=1), health=health, health_failures=failures)


def test_backoff_schedule_doubles_from_10_s_to_a_300_s_cap() -> None:
    assert [backoff_delay(n, CFG) for n in range(8)] == [10, 20, 40, 80, 160, 300, 300, 300]
    assert backoff_delay(10_000, CFG) == 300


def test_backoff_numbers_are_configurable() -> None:
    cfg = BackoffConfig(base_s=0.5, max_s=3)
    assert [backoff_delay(n, cfg) for n in range(4)] == [0.5, 1, 2, 3]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"base_s": 0}, "base_s must be positive"),
        ({"base_s": 10, "max_s": 5}, "max_s (5) must be at least base_s (10)"),
        ({"reset_after_s": 0}, "reset_after_s must be positive"),
    ],
)
def test_bad_config_is_refused(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        RestartPolicyConfig(**kwargs)


def test_negative_count_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        backoff_delay(-1, CFG)


POLICY_TABLE = [
    # policy, observation, expected decision type
    ("always", exited(0), RestartNow),
    ("always", exited(1), RestartNow),
    ("always", sick(), RestartNow),
    ("on-unhealthy", exited(0), DontRestart),
    ("on-unhealthy", exited(1), RestartNow),
    ("on-unhealthy", sick(), RestartNow),
    ("on-failure", exited(0), DontRestart),
    ("on-failure", exited(137), RestartNow),
    ("on-failure", exited(None), RestartNow),
    ("on-failure", sick(), DontRestart),
    ("never", exited(1), DontRestart),
    ("never", sick(), DontRestart),
    ("always", observed("dead"), RestartNow),
    ("always", sick(failures=2), DontRestart),
    ("always", observed(), DontRestart),
]


@pytest.mark.parametrize(
    ("policy", "obs", "kind"), POLICY_TABLE, ids=[f"{p}-{i}" for i, (p, *_) in enumerate(POLICY_TABLE)]
)
def test_policy_table(policy: Any, obs: ObservedModule, kind: type) -> None:
    decision = should_restart(policy, obs, RestartBook(), NOW, CFG, failure_threshold=3)
    assert type(decision) is kind
    assert decision.reason


def test_back_off_counts_from_the_last_exit() -> None:
    decision = should_restart(
        "always", exited(1, ago_s=15), RestartBook(count=1), NOW, CFG, failure_threshold=3
    )
    assert isinstance(decision, WaitUntil)
    assert decision.at == NOW + timedelta(seconds=5)
    assert decision.reason == (
        "exited with code 1; back-off 20 s after 1 restarts, next restart at 2026-03-01T12:00:05+00:00"
    )


def test_unhealthy_back_off_counts_from_the_last_restart() -> None:
    book = RestartBook(count=3, last_restart_at=NOW - timedelta(seconds=30))
    decision = should_restart("always", sick(), book, NOW, CFG, failure_threshold=3)
    assert isinstance(decision, WaitUntil)
    assert decision.at == NOW + timedelta(seconds=50)
    assert decision.reason.startswith("unhealthy (3 failed liveness probes in a row, last: timed out)")


def test_restart_reason_counts_restarts() -> None:
    decision = should_restart("on-failure", exited(2), RestartBook(count=4), NOW, CFG, failure_threshold=3)
    assert decision == RestartNow("exited with code 2; restart #5 (policy 'on-failure')")


def test_no_policy_restart_says_why() -> None:
    decision = should_restart("never", exited(1), RestartBook(), NOW, CFG, failure_threshold=3)
    assert decision == DontRestart("exited with code 1; restart policy 'never' does not restart it")


def test_record_restart() -> None:
    book = RestartBook(count=2, healthy_since=NOW - timedelta(minutes=1), stopped=True)
    assert record_restart(book, NOW) == RestartBook(count=3, last_restart_at=NOW)


def test_count_resets_after_ten_minutes_of_healthy_running() -> None:
    book = RestartBook(count=4, last_restart_at=NOW - timedelta(minutes=20))
    seen = refresh_book(book, observed(), NOW, CFG, unhealthy=False)
    assert seen.healthy_since == NOW and seen.count == 4
    nine = refresh_book(seen, observed(), NOW + timedelta(minutes=9), CFG, unhealthy=False)
    assert nine == seen
    ten = refresh_book(seen, observed(), NOW + timedelta(minutes=10), CFG, unhealthy=False)
    assert ten.count == 0 and ten.healthy_since is None


def test_unhealthy_spell_breaks_the_healthy_run() -> None:
    book = RestartBook(count=4, healthy_since=NOW - timedelta(minutes=9))
    broken = refresh_book(book, sick(), NOW, CFG, unhealthy=True)
    assert broken == RestartBook(count=4)
    again = refresh_book(broken, observed(), NOW + timedelta(minutes=2), CFG, unhealthy=False)
    assert again.count == 4 and again.healthy_since == NOW + timedelta(minutes=2)


def test_crash_after_a_long_healthy_run_starts_from_zero() -> None:
    book = RestartBook(count=5, healthy_since=NOW - timedelta(hours=2))
    after_crash = refresh_book(book, exited(1, ago_s=5), NOW, CFG, unhealthy=False)
    assert after_crash == RestartBook(count=0)
    decision = should_restart("always", exited(1, ago_s=5), after_crash, NOW, CFG, failure_threshold=3)
    assert isinstance(decision, WaitUntil)
    assert decision.at == NOW + timedelta(seconds=5)


def test_crash_after_a_short_run_keeps_the_count() -> None:
    book = RestartBook(count=5, healthy_since=NOW - timedelta(minutes=2))
    assert refresh_book(book, exited(1, ago_s=5), NOW, CFG, unhealthy=False) == RestartBook(count=5)


def test_reset_time_is_configurable() -> None:
    cfg = RestartPolicyConfig(reset_after_s=30)
    book = RestartBook(count=2, healthy_since=NOW - timedelta(seconds=30))
    assert refresh_book(book, observed(), NOW, cfg, unhealthy=False).count == 0
