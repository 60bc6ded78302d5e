"""Whether a newly applied generation became healthy in time, and what to do when it did not. Pure.

After applying a generation the agent calls ``evaluate_rollout`` on every tick until it returns
``Healthy`` (the generation becomes the last known good) or ``Failed`` (its
``health_deadline_s`` passed first). On ``Failed``, ``decide_rollback`` says whether to go back to
the last known good desired state (``RollBack``, reported as ``rolled_back``) or to stay and report
``failed`` (``StayFailed``: rollback is ``none``, or there is nothing to go back to).

A module counts as healthy when it runs the desired configuration and its last probe was live and
ready (one such observation of every module is enough); a module desired ``stopped`` counts once it
exists with the desired configuration and is not running, and so does one that exited with code 0
under a policy that does not restart clean exits (it finished). Rolling back to a last known good state
whose ``expires_at`` has passed is fine: expiry limits how long a *message* may be admitted, not how
long a state the device already ran may be restored.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from agent.observed import ImageAvailability, ObservedModule, config_hash
from modules.contract import DesiredModule, DesiredState


@dataclass(frozen=True)
class Healthy:
    """Every module is healthy: the generation is good."""


@dataclass(frozen=True)
class Pending:
    """Not healthy yet, still within the deadline; ``waiting_for`` lists ``module: problem``."""

    deadline: datetime
    waiting_for: tuple[str, ...]


@dataclass(frozen=True)
class Failed:
    """The deadline passed before every module was healthy."""

    reason: str


RolloutVerdict = Healthy | Pending | Failed


@dataclass(frozen=True)
class RollBack:
    """Apply ``target`` (the last known good desired state) instead, and report ``rolled_back``."""

    target: DesiredState
    reason: str


@dataclass(frozen=True)
class StayFailed:
    """Keep the failed generation (restart policies still apply) and report ``failed``."""

    reason: str


def module_problem(
    m: DesiredModule, o: ObservedModule | None, images: ImageAvailability | None = None
) -> str | None:
    """Why a module is not healthy yet, in a few words, or ``None`` when it is."""
    images = images or ImageAvailability()
    if o is None or o.config_hash != config_hash(m):
        what = "not created yet" if o is None else "still runs the previous configuration"
        failure = images.failed.get(m.image)
        if images.is_pulling(m.image):
            return f"{what}, pulling {m.image}"
        if failure is not None and not images.is_present(m.image):
            return f"{what}, pull of {m.image} failed: {failure.error}"
        return what
    if m.desired_status == "stopped":
        return "still running, desired stopped" if o.is_running else None
    if o.status == "exited" and o.exit_code == 0 and m.restart_policy != "always":
        return None  # finished, and its policy does not restart clean exits
    if o.status in ("exited", "dead"):
        return f"exited with code {o.exit_code}" if o.exit_code is not None else o.status
    if o.status != "running":
        return o.status
    if o.health is None:
        return "running, not probed yet"
    if not o.health.live or not o.health.ready:
        state = "not live" if not o.health.live else "not ready"
        return f"running, {state}" + (f": {o.health.error}" if o.health.error else "")
    return None


def evaluate_rollout(
    desired: DesiredState,
    applied_at: datetime,
    observed: Mapping[str, ObservedModule],
    now: datetime,
    images: ImageAvailability | None = None,
) -> RolloutVerdict:
    """Healthy, pending until ``applied_at + desired.health_deadline_s``, or failed after it."""
    problems = tuple(
        f"{name}: {problem}"
        for name, m in sorted(desired.modules.items())
        if (problem := module_problem(m, observed.get(name), images)) is not None
    )
    if not problems:
        return Healthy()
    deadline = applied_at + timedelta(seconds=desired.health_deadline_s)
    if now < deadline:
        return Pending(deadline, problems)
    return Failed(
        f"generation {desired.generation} not healthy within {desired.health_deadline_s:g} s: "
        + "; ".join(problems)
    )


def decide_rollback(
    failed: Failed, desired: DesiredState, last_known_good: DesiredState | None
) -> RollBack | StayFailed:
    """Roll back to ``last_known_good`` when the desired state allows it and there is one."""
    if desired.rollback == "none":
        return StayFailed(f"{failed.reason}; not rolled back (rollback: none)")
    if last_known_good is None:
        return StayFailed(f"{failed.reason}; no known good generation to roll back to")
    if last_known_good.generation >= desired.generation:
        return StayFailed(
            f"{failed.reason}; the last known good generation is {last_known_good.generation}, not older"
        )
    return RollBack(
        last_known_good, f"{failed.reason}; rolled back to generation {last_known_good.generation}"
    )
