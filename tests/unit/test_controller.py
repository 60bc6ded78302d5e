"""The rollout controller's pass (``Controller.step``) over a recording fleet: order, timing, failures.

The broker side (connecting, retrying, ingesting) runs against a real Mosquitto in
tests/integration/test_fleet_publish.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from cloud.fleet.controller import Controller, Status
from cloud.fleet.removal import ClearReport
from cloud.fleet.results import PublishReport
from edgemqtt.endpoint import Endpoint

ENDPOINT = Endpoint.parse("mqtt://127.0.0.1:1883")


class RecordingFleet:
    """Records the fleet calls a pass makes; ``fail`` names a call that raises once."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.fail: str | None = None

    def _record(self, name: str) -> None:
        self.calls.append(name)
        if self.fail == name:
            self.fail = None
            raise RuntimeError(f"{name} broke")

    def recompute(self) -> int:
        self._record("recompute")
        return 2

    def advance_rollouts(self, *, endpoint: Endpoint | None = None) -> list[str]:
        self._record("advance")
        return ["vision: wave 1 done; starting wave 2"]

    def clear_removed(self, endpoint: Endpoint) -> ClearReport:
        self._record("clear")
        return ClearReport(["cam-9"], [])

    def publish_pending(self, endpoint: Endpoint) -> PublishReport:
        self._record("publish")
        return PublishReport(3, 1, "the MQTT broker acknowledged 3 of 4 messages")


def controller(fleet: RecordingFleet, lines: list[str], **options: Any) -> Controller:
    return Controller(fleet, ENDPOINT, say=lines.append, warn=lambda w: lines.append(f"warn: {w}"), **options)  # type: ignore[arg-type]


async def test_a_pass_recomputes_when_due_then_advances_clears_and_publishes() -> None:
    fleet, lines = RecordingFleet(), list[str]()
    status = Status()
    c = controller(fleet, lines, status=status, recompute_every_s=3600)
    await c.step()
    await c.step()
    assert fleet.calls == ["recompute", "advance", "clear", "publish", "advance", "clear", "publish"]
    assert lines[:4] == [
        "2 new desired state(s): new devices or re-signed states",
        "vision: wave 1 done; starting wave 2",
        "cleared the retained messages of removed device(s) cam-9",
        "published 3 pending desired state(s)",
    ]
    assert status.passes == 2 and status.error == "the MQTT broker acknowledged 3 of 4 messages"


@pytest.mark.parametrize("broken", ["recompute", "advance", "clear", "publish"])
async def test_a_failing_pass_is_reported_and_the_next_one_runs(broken: str) -> None:
    fleet, lines = RecordingFleet(), list[str]()
    fleet.fail = broken
    status = Status()
    c = controller(fleet, lines, status=status, recompute_every_s=0)
    await c.step()
    assert status.error == f"controller pass failed: RuntimeError: {broken} broke"
    assert lines[-1] == f"warn: controller pass failed: RuntimeError: {broken} broke; trying again in 2 s"
    assert fleet.calls[-1] == broken
    fleet.calls.clear()
    await c.step()
    assert fleet.calls == ["recompute", "advance", "clear", "publish"]
    assert status.passes == 2
