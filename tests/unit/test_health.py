"""Table tests of the liveness count: the start period (Docker's start period, a startup probe)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.health import HealthProber, LivenessCount, count_probe


@dataclass(frozen=True)
class Row:
    """Probes ``(seconds since the start, live?)`` in order → counted failures after each."""

    start_period_s: float
    probes: list[tuple[float, bool]]
    failures: list[int]
    starting: list[bool]


ROWS = {
    "slow start: refused for 30 s, then live, never counted": Row(
        120,
        [(5, False), (10, False), (20, False), (30, False), (35, True)],
        [0, 0, 0, 0, 0],
        [True, True, True, True, False],
    ),
    "live once, then down: counted at once inside the start period": Row(
        120,
        [(2, False), (4, True), (6, False), (8, False), (10, False)],
        [0, 0, 1, 2, 3],
        [True, False, False, False, False],
    ),
    "never live: counted from the end of the start period": Row(
        10,
        [(4, False), (8, False), (12, False), (16, False)],
        [0, 0, 1, 2],
        [True, True, False, False],
    ),
    "no start period: counted from the first probe": Row(0, [(1, False), (2, False)], [1, 2], [False, False]),
    "a success resets the count": Row(
        0, [(1, False), (2, False), (3, True), (4, False)], [1, 2, 0, 1], [False, False, False, False]
    ),
    "started long ago (adopted after an agent restart): counted at once": Row(
        120, [(3600, False), (3605, False)], [1, 2], [False, False]
    ),
}


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_count_probe(row: Row) -> None:
    count = LivenessCount()
    failures, starting = [], []
    for since_start_s, live in row.probes:
        count = count_probe(count, live, since_start_s, row.start_period_s)
        failures.append(count.failures)
        starting.append(count.starting)
    assert failures == row.failures
    assert starting == row.starting


def test_negative_start_period_is_refused() -> None:
    with pytest.raises(ValueError, match="start_period_s must not be negative, got -1"):
        HealthProber(start_period_s=-1)
