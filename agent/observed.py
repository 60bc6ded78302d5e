"""What a runtime observes, as plain immutable values the planner decides on.

A runtime (``agent/runtime/docker.py``, ``agent/runtime/process.py``) builds these on every tick:
one ``ObservedModule`` per module it runs *for this agent* (containers or processes it labelled
itself; anything else on the device is invisible here) and one ``ImageAvailability`` saying which
images the current desired state needs are present, being pulled, or failed to pull. The health
prober fills in ``health`` and ``health_failures``. Nothing here does I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Literal

from modules.contract import LATER_MODULE_FIELDS, DesiredModule, ModuleHealth, PullProgress, canonical_json

ObservedStatus = Literal["created", "running", "paused", "restarting", "removing", "exited", "dead"]
"""Docker's container states; the process runtime uses ``created``, ``running`` and ``exited``."""

TRANSITIONAL: frozenset[ObservedStatus] = frozenset({"paused", "restarting", "removing"})
"""States the planner leaves alone (a new observation will show where they settle)."""

CONFIG_FIELDS = frozenset({"image", "profile", "env", "batching", "ports", "resources"})
"""The ``DesiredModule`` fields a container or process is created from: a change means recreate.

``restart_policy``, ``desired_status``, ``startup_order`` and ``health`` are applied by the agent
itself and ``version`` is for reporting, so changing them never recreates a module.
"""


def config_hash(module: DesiredModule) -> str:
    """A stable hex digest of the fields a module is created from (``CONFIG_FIELDS``).

    Runtimes store it on what they create (a container label, a process record) and report it
    back in ``ObservedModule.config_hash``; the planner recreates a module when it differs.
    """
    data = module.model_dump(mode="json", include=set(CONFIG_FIELDS))
    for name in LATER_MODULE_FIELDS:  # unset: the digest modules had before the field existed
        if data.get(name) is None:
            data.pop(name, None)
    return hashlib.sha256(canonical_json(data)).hexdigest()


@dataclass(frozen=True)
class ObservedModule:
    """One module as the runtime sees it now.

    ``image`` is the reference the module was created from (as written in the desired state),
    ``image_id`` the local image id or digest it runs. ``exit_code`` and ``finished_at`` describe
    the last exit (``None`` while it never exited). ``health`` is the last probe (``None`` before
    the first), ``health_failures`` the number of consecutive failed liveness probes since the
    last success; the module is unhealthy once it reaches its ``health.failure_threshold``.
    ``instance`` names the process or container the runtime started, as the module echoes it.
    """

    name: str
    image: str
    status: ObservedStatus
    config_hash: str | None = None
    image_id: str | None = None
    exit_code: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    health: ModuleHealth | None = None
    health_failures: int = 0
    instance: str | None = None
    """The instance id the runtime gave this start (``EDGE_INSTANCE_ID``); probes must meet it."""

    @property
    def is_running(self) -> bool:
        """True while the module's process is up (running, or paused/restarting in between)."""
        return self.status in ("running", "paused", "restarting")

    def is_unhealthy(self, failure_threshold: int) -> bool:
        """True when running and its liveness probe failed ``failure_threshold`` times in a row."""
        return self.status == "running" and self.health_failures >= failure_threshold


@dataclass(frozen=True)
class PullFailure:
    """The last failed pull of an image: ``attempts`` failures in a row, the last at ``failed_at``."""

    error: str
    """The cause, e.g. ``manifest unknown``; reports say ``pull of IMAGE failed: <error>``."""
    failed_at: datetime
    attempts: int = 1


def _frozen_map(value: Mapping[str, PullFailure]) -> Mapping[str, PullFailure]:
    return MappingProxyType(dict(value))


@dataclass(frozen=True)
class ImageAvailability:
    """Which image references (written as in the desired state) are local, pulling, or failing.

    ``present``: references that resolve to a local image. ``pulling``: pulls in flight (started
    by a ``Pull`` action, still running in the background). ``failed``: the last failure of each
    reference whose most recent pull failed; the runtime drops the entry once a pull succeeds.
    ``progress``: how far each pull in flight has come, where the runtime knows.
    """

    present: AbstractSet[str] = frozenset()
    pulling: AbstractSet[str] = frozenset()
    failed: Mapping[str, PullFailure] = field(default_factory=dict)
    progress: Mapping[str, PullProgress] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "present", frozenset(self.present))
        object.__setattr__(self, "pulling", frozenset(self.pulling))
        object.__setattr__(self, "failed", _frozen_map(self.failed))
        object.__setattr__(self, "progress", MappingProxyType(dict(self.progress)))

    def is_present(self, image: str) -> bool:
        """True when ``image`` can be used to create a module without pulling."""
        return image in self.present

    def is_pulling(self, image: str) -> bool:
        """True while a pull of ``image`` is in flight."""
        return image in self.pulling
