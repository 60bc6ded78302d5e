"""Rollout waves: how a deployment's devices are split, and when the next wave starts. Pure.

``rollout.waves`` lists *cumulative* sizes: ``[1, "10%", "50%", "100%"]`` means the first
device, then up to 10 % of the target, then half, then all. Counts and percentages may be mixed;
a percentage rounds up, so ``10%`` of 5 devices is 1. Waves that would add no device are
dropped, and a final wave covering every remaining device is implied, so a rollout always ends on
the whole target. Devices are taken in device-id order, so a re-computation puts every device in
the same wave.

A wave is done when each of its devices is healthy, failed, or offline (an offline device gets
its desired state, retained, when it returns and does not hold the fleet back). A device that
*reported* ``deadline_s`` or more after its wave started and is still not healthy counts as
failed: deadlines are judged from what the devices said and when, never from when the controller
happens to look (a controller started late, before the latest reports reached the store, would
otherwise fail devices that are healthy). The rollout halts as soon as the failed share of the
released devices exceeds ``max_failure_ratio``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from cloud.fleet.status import SETTLED_FAILED, Status

DecisionKind = Literal["wait", "advance", "complete", "halt"]


def wave_sizes(waves: Sequence[int | str], total: int) -> list[int]:
    """Cumulative device counts per wave for a target of ``total`` devices (see module docstring)."""
    sizes: list[int] = []
    for wave in waves:
        if isinstance(wave, str) and wave.endswith("%"):
            count = math.ceil(float(wave[:-1]) * total / 100 - 1e-9)
        else:
            count = int(wave)
        count = min(count, total)
        if count > (sizes[-1] if sizes else 0):
            sizes.append(count)
    if total and (not sizes or sizes[-1] < total):
        sizes.append(total)
    return sizes


def split_waves(device_ids: Sequence[str], waves: Sequence[int | str]) -> list[list[str]]:
    """The devices of each wave, in device-id order."""
    ordered = sorted(device_ids)
    out: list[list[str]] = []
    start = 0
    for end in wave_sizes(waves, len(ordered)):
        out.append(ordered[start:end])
        start = end
    return out


@dataclass(frozen=True)
class Decision:
    """What the controller must do next, and why."""

    kind: DecisionKind
    reason: str
    failed: int = 0
    released: int = 0


def evaluate(
    waves: Sequence[Sequence[str]],
    current: int,
    statuses: Mapping[str, Status],
    *,
    max_failure_ratio: float,
    wave_started_at: datetime,
    now: datetime,
    deadline_s: float,
    heard_at: Mapping[str, datetime],
) -> Decision:
    """Decide whether wave ``current`` (0-based) is done, the rollout must halt, or must wait.

    ``statuses`` holds the status of every released device (waves ``0..current``); a device
    missing from it is pending. Devices of earlier waves still pending (back from offline) count
    in the failure ratio once they fail, but no longer hold the rollout. ``heard_at``: when each
    device made its latest report; one not heard from since the deadline is waited for.
    """
    released = [d for wave in waves[: current + 1] for d in wave]
    in_wave = set(waves[current]) if current < len(waves) else set()
    deadline_at = wave_started_at + timedelta(seconds=deadline_s)
    failed = 0
    waiting = 0
    unheard = 0
    for device in released:
        status = statuses.get(device, "pending")
        if status in SETTLED_FAILED:
            failed += 1
        elif status == "stale" and device in in_wave:
            waiting += 1  # its last report no longer stands, healthy or not: wait for a fresh one
        elif status in ("pending", "applying") and device in in_wave:
            heard = heard_at.get(device)
            if heard is not None and heard >= deadline_at:
                failed += 1  # it said so itself after the deadline
            else:
                waiting += 1
                unheard += now >= deadline_at
    ratio = failed / len(released) if released else 0.0
    if ratio > max_failure_ratio:
        return Decision(
            "halt",
            f"{failed} of {len(released)} released device(s) failed ({ratio:.0%} > max_failure_ratio "
            f"{max_failure_ratio:.0%})",
            failed,
            len(released),
        )
    if waiting:
        quiet = f" ({unheard} not heard from since the health deadline)" if unheard else ""
        return Decision(
            "wait", f"wave {current + 1}: {waiting} device(s) not settled yet{quiet}", failed, len(released)
        )
    if current + 1 >= len(waves):
        return Decision("complete", f"all {len(waves)} wave(s) done", failed, len(released))
    return Decision("advance", f"wave {current + 1} done; starting wave {current + 2}", failed, len(released))
