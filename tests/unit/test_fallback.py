"""On-device profile fallback decisions (pure): first present profile, fall back on accelerator failures."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from agent.fallback import accelerator_failure, choose, effective, initial_choice
from agent.observed import ObservedModule
from modules.contract import DesiredModule, DesiredState

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
FALLBACKS = [{"profile": "cuda", "image": "r/m:cu"}, {"profile": "cpu", "image": "r/m:cpu"}]


def module(**kw: Any) -> DesiredModule:
    return DesiredModule.model_validate(
        {"image": "r/m:trt", "profile": "tensorrt", "fallbacks": FALLBACKS, **kw}
    )


def state(m: DesiredModule) -> DesiredState:
    return DesiredState(
        device_id="d", generation=1, issued_at=T0, expires_at=T0.replace(year=2027), modules={"m": m}
    )


def exited(image: str, code: int) -> ObservedModule:
    return ObservedModule(name="m", image=image, status="exited", exit_code=code)


def test_the_first_present_profile_runs() -> None:
    assert initial_choice(module(), {"tensorrt", "cpu"}, set()).current.image == "r/m:trt"
    skipped = initial_choice(module(), {"cpu"}, set())
    assert (skipped.current.profile, skipped.note) == (
        "cpu",
        "tensorrt, cuda not detected on this device: runs the cpu image",
    )
    assert initial_choice(module(), {"cpu"}, {"tensorrt"}).current.profile == "tensorrt", (
        "strict: no skipping"
    )


def test_accelerator_failures_are_recognised_and_others_are_not() -> None:
    driver = 'could not select device driver "nvidia" with capabilities: [[gpu]]'
    assert accelerator_failure(None, f"start failed: {driver}") == f"start failed: {driver}"
    assert accelerator_failure(exited("r/m:trt", 3), None) is not None
    assert accelerator_failure(exited("r/m:trt", 1), None) is None
    assert accelerator_failure(None, "pull of r/m:trt failed: not found") is None
    missing_binary = 'exec: "/missing-binary": stat /missing-binary: no such file or directory: unknown'
    assert accelerator_failure(None, missing_binary) is None, "a broken image is not an accelerator failure"


def test_choose_falls_back_one_step_per_failure_and_stops_at_the_end() -> None:
    desired = state(module())
    here = {"tensorrt", "cuda", "cpu"}
    choices, lines = choose(desired, {}, {}, {}, here, set())
    assert choices["m"].index == 0 and lines == []
    choices, lines = choose(desired, choices, {"m": exited("r/m:trt", 3)}, {}, here, set())
    assert choices["m"].current.profile == "cuda" and lines[0].startswith(
        "module m: tensorrt failed to start"
    )
    ran = effective(desired, choices)
    assert ran is not None and (ran.modules["m"].image, ran.modules["m"].profile) == ("r/m:cu", "cuda")
    assert [f.profile for f in ran.modules["m"].fallbacks or []] == ["cpu"]
    choices, _ = choose(desired, choices, {"m": exited("r/m:trt", 3)}, {}, here, set())
    assert choices["m"].current.profile == "cuda", "a failure of an image no longer running is not counted"
    choices, _ = choose(desired, choices, {}, {"m": "error gathering device information"}, here, set())
    assert choices["m"].current.profile == "cpu"
    assert choices["m"].note is not None and choices["m"].note.count("failed to start") == 2
    choices, lines = choose(desired, choices, {"m": exited("r/m:cpu", 3)}, {}, here, set())
    assert choices["m"].current.profile == "cpu" and lines == [], "nothing left: the failure stands"


def test_strict_profiles_never_fall_back_and_new_candidates_start_over() -> None:
    desired = state(module())
    choices, _ = choose(desired, {}, {"m": exited("r/m:trt", 3)}, {}, {"tensorrt", "cpu"}, {"tensorrt"})
    assert choices["m"].index == 0
    choices, _ = choose(desired, {}, {"m": exited("r/m:trt", 3)}, {}, {"tensorrt", "cpu"}, set())
    assert choices["m"].index == 1
    renewed = state(module(fallbacks=[{"profile": "cpu", "image": "r/m:cpu2"}]))
    choices, _ = choose(renewed, choices, {}, {}, {"tensorrt", "cpu"}, set())
    assert choices["m"].index == 0
    assert effective(renewed, choices) is renewed, "unchanged when every module runs its first choice"
