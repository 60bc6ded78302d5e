"""Rollout evaluation against the health deadline, and the rollback decision."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from agent.observed import ImageAvailability, ObservedModule, PullFailure, config_hash
from agent.rollback import (
    Failed,
    Healthy,
    Pending,
    RollBack,
    StayFailed,
    decide_rollback,
    evaluate_rollout,
    module_problem,
)
from modules.contract import DesiredModule, DesiredState, ModuleHealth

APPLIED = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
WEB = DesiredModule(image="localhost:5000/web:2")
API = DesiredModule(image="localhost:5000/api:2", restart_policy="on-failure")
GOOD = ModuleHealth(live=True, ready=True, latency_ms=3.0)


def desired(generation: int = 7, **kw: Any) -> DesiredState:
    return DesiredState(
        device_id="dev1",
        generation=generation,
        issued_at=APPLIED - timedelta(minutes=1),
        expires_at=APPLIED + timedelta(days=1),
        modules=kw.pop("modules", {"web": WEB, "api": API}),
        health_deadline_s=60,
        **kw,
    )


def seen(name: str, m: DesiredModule, status: str = "running", **kw: Any) -> ObservedModule:
    kw.setdefault("health", GOOD if status == "running" else None)
    kw.setdefault("config_hash", config_hash(m))
    return ObservedModule(name=name, image=m.image, status=status, **kw)  # type: ignore[arg-type]


def test_all_live_and_ready_is_healthy() -> None:
    observed = {"web": seen("web", WEB), "api": seen("api", API)}
    assert evaluate_rollout(desired(), APPLIED, observed, APPLIED + timedelta(seconds=5)) == Healthy()


def test_not_ready_before_the_deadline_is_pending() -> None:
    observed = {
        "web": seen("web", WEB, health=ModuleHealth(live=True, ready=False, error="loading model")),
        "api": seen("api", API),
    }
    verdict = evaluate_rollout(desired(), APPLIED, observed, APPLIED + timedelta(seconds=59))
    assert verdict == Pending(APPLIED + timedelta(seconds=60), ("web: running, not ready: loading model",))


def test_not_healthy_at_the_deadline_fails_with_every_problem() -> None:
    observed = {"web": seen("web", WEB, "exited", exit_code=3)}
    images = ImageAvailability(failed={API.image: PullFailure("manifest unknown", APPLIED)})
    verdict = evaluate_rollout(desired(), APPLIED, observed, APPLIED + timedelta(seconds=60), images)
    assert verdict == Failed(
        "generation 7 not healthy within 60 s: "
        "api: not created yet, pull of localhost:5000/api:2 failed: manifest unknown; "
        "web: exited with code 3"
    )


PROBLEMS = {
    "absent": (WEB, None, None, "not created yet"),
    "absent, pulling": (
        WEB,
        None,
        ImageAvailability(pulling={WEB.image}),
        "not created yet, pulling localhost:5000/web:2",
    ),
    "old configuration": (
        WEB,
        seen("web", WEB, config_hash="old"),
        None,
        "still runs the previous configuration",
    ),
    "created": (WEB, seen("web", WEB, "created"), None, "created"),
    "dead": (WEB, seen("web", WEB, "dead"), None, "dead"),
    "restarting": (WEB, seen("web", WEB, "restarting"), None, "restarting"),
    "not probed": (WEB, seen("web", WEB, health=None), None, "running, not probed yet"),
    "not live": (
        WEB,
        seen("web", WEB, health=ModuleHealth(live=False, ready=False, error="HTTP 500")),
        None,
        "running, not live: HTTP 500",
    ),
    "healthy": (WEB, seen("web", WEB), None, None),
    "clean exit under always": (WEB, seen("web", WEB, "exited", exit_code=0), None, "exited with code 0"),
    "clean exit under on-failure: finished": (API, seen("api", API, "exited", exit_code=0), None, None),
    "desired stopped and stopped": (
        DesiredModule(image=WEB.image, desired_status="stopped"),
        seen("web", DesiredModule(image=WEB.image, desired_status="stopped"), "exited", exit_code=143),
        None,
        None,
    ),
    "desired stopped, still running": (
        DesiredModule(image=WEB.image, desired_status="stopped"),
        seen("web", DesiredModule(image=WEB.image, desired_status="stopped")),
        None,
        "still running, desired stopped",
    ),
}


@pytest.mark.parametrize(("m", "o", "images", "problem"), PROBLEMS.values(), ids=PROBLEMS.keys())
def test_module_problem(
    m: DesiredModule, o: ObservedModule | None, images: ImageAvailability | None, problem: str | None
) -> None:
    assert module_problem(m, o, images) == problem


def test_empty_generation_is_healthy_at_once() -> None:
    assert evaluate_rollout(desired(modules={}), APPLIED, {}, APPLIED) == Healthy()


FAILED = Failed("generation 7 not healthy within 60 s: web: exited with code 3")


def test_rolls_back_to_the_last_known_good() -> None:
    good = desired(generation=6)
    decision = decide_rollback(FAILED, desired(), good)
    assert decision == RollBack(good, FAILED.reason + "; rolled back to generation 6")


def test_rollback_none_is_respected() -> None:
    decision = decide_rollback(FAILED, desired(rollback="none"), desired(generation=6))
    assert decision == StayFailed(FAILED.reason + "; not rolled back (rollback: none)")


def test_nothing_to_roll_back_to() -> None:
    decision = decide_rollback(FAILED, desired(), None)
    assert decision == StayFailed(FAILED.reason + "; no known good generation to roll back to")


def test_never_rolls_forward() -> None:
    decision = decide_rollback(FAILED, desired(), desired(generation=7))
    assert isinstance(decision, StayFailed)
    assert decision.reason.endswith("the last known good generation is 7, not older")
