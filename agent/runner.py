"""The plan runner: executes a ``Plan`` in order through a table of executors, and retries failures.

``PlanRunner.run`` looks up ``executors[action.kind]`` for each action (the runtime's for
``pull``/``create``/``start``/``stop``/``remove``/``restart``, the agent's own for
``set_restart_book``; ``wait`` does nothing) and logs every action with its reason. When an action
fails, the rest of that module's actions in the plan are skipped and the other modules go on (the
next pass plans again from a fresh observation). Statistics are kept per action id
(``"<kind> <module>"``, like edgeAgent's ``OrderedRetryPlanRunner``): an action that failed ``n``
times in a row is not tried again before ``min(base_s * 2**(n-1), max_s)`` seconds have passed,
and its last error is what the agent reports in the module's message. Statistics of actions the
plan no longer asks for are dropped: the failure no longer matters.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Protocol

from agent.actions import Action, ActionKind, Plan
from agent.restart import BackoffConfig, backoff_delay

log = logging.getLogger(__name__)

Executor = Callable[[Any], Awaitable[None]]


class ActionCounter(Protocol):
    """Where the runner counts actions by kind and result (``ok``, ``failed``, ``skipped``)."""

    def action(self, kind: str, result: str) -> None:
        """Count one action of ``kind`` that ended with ``result``."""
        ...


def action_id(action: Action) -> str:
    """The key retry statistics are kept under: ``"<kind> <module>"``."""
    return f"{action.kind} {action.module}"


@dataclass(frozen=True)
class ActionStats:
    """How an action id fared: runs, failures, failures in a row, and the last error and when."""

    runs: int = 0
    failures: int = 0
    failures_in_row: int = 0
    last_error: str | None = None
    last_failed_at: datetime | None = None

    def retry_at(self, cfg: BackoffConfig) -> datetime | None:
        """When the action may run again after its last failure (``None``: no failure in a row)."""
        if self.failures_in_row == 0 or self.last_failed_at is None:
            return None
        return self.last_failed_at + timedelta(seconds=backoff_delay(self.failures_in_row - 1, cfg))


@dataclass(frozen=True)
class ModuleError:
    """The failure that holds a module back: the action, its error, attempts so far, next try."""

    action: str
    error: str
    attempts: int
    retry_at: datetime | None

    def __str__(self) -> str:
        text = f"{self.action} failed ({self.attempts}x): {self.error}"
        return text + (f"; retry at {self.retry_at.isoformat()}" if self.retry_at else "")


@dataclass(frozen=True)
class RunResult:
    """What one ``run`` did: actions executed (waits excluded), failed, skipped by back-off."""

    executed: tuple[Action, ...] = ()
    failed: tuple[Action, ...] = ()
    held: tuple[Action, ...] = ()
    wake_at: datetime | None = None
    """The earliest time an action held back by its retry back-off may run again."""

    @property
    def changed_anything(self) -> bool:
        """True when an action ran (successfully or not): the next pass should look again soon."""
        return bool(self.executed or self.failed)


@dataclass
class PlanRunner:
    """Runs plans through ``executors``; one plan at a time (``lock`` is shared with commands)."""

    executors: Mapping[ActionKind, Executor]
    retry: BackoffConfig = field(default_factory=lambda: BackoffConfig(base_s=1.0, max_s=60.0))
    counter: ActionCounter | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    stats: dict[str, ActionStats] = field(default_factory=dict)

    async def run(self, plan: Plan, now: datetime) -> RunResult:
        """Execute ``plan`` in order at ``now``; never raises for a failed action."""
        wanted = {action_id(a) for a in plan}
        for stale in self.stats.keys() - wanted:
            del self.stats[stale]
        executed: list[Action] = []
        failed: list[Action] = []
        held: list[Action] = []
        blocked: set[str] = set()
        wake_at: datetime | None = None
        async with self.lock:
            for action in plan:
                if action.kind == "wait":
                    log.debug("%s", action)
                    continue
                if action.module in blocked:
                    self._count(action.kind, "skipped")
                    continue
                key = action_id(action)
                stats = self.stats.get(key, ActionStats())
                retry_at = stats.retry_at(self.retry)
                if retry_at is not None and now < retry_at:
                    held.append(action)
                    blocked.add(action.module)
                    wake_at = retry_at if wake_at is None else min(wake_at, retry_at)
                    self._count(action.kind, "skipped")
                    continue
                if await self._execute(action, key, stats, now):
                    executed.append(action)
                else:
                    failed.append(action)
                    blocked.add(action.module)
                    retry = self.stats[key].retry_at(self.retry)
                    if retry is not None:
                        wake_at = retry if wake_at is None else min(wake_at, retry)
        return RunResult(tuple(executed), tuple(failed), tuple(held), wake_at)

    async def run_now(self, action: Action, now: datetime) -> str | None:
        """Execute one action at once, ignoring its back-off; ``None`` on success, else the error."""
        key = action_id(action)
        async with self.lock:
            if await self._execute(action, key, self.stats.get(key, ActionStats()), now):
                return None
        return self.stats[key].last_error

    async def _execute(self, action: Action, key: str, stats: ActionStats, now: datetime) -> bool:
        executor = self.executors.get(action.kind)
        if executor is None:
            error = f"no executor for {action.kind!r} actions"
        else:
            log.info("%s", action)
            try:
                await executor(action)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = str(exc) or type(exc).__name__
            else:
                self.stats[key] = replace(stats, runs=stats.runs + 1, failures_in_row=0, last_error=None)
                self._count(action.kind, "ok")
                return True
        new = replace(
            stats,
            runs=stats.runs + 1,
            failures=stats.failures + 1,
            failures_in_row=stats.failures_in_row + 1,
            last_error=error,
            last_failed_at=now,
        )
        self.stats[key] = new
        log.warning("%s failed (%d in a row): %s", key, new.failures_in_row, error)
        self._count(action.kind, "failed")
        return False

    def _count(self, kind: str, result: str) -> None:
        if self.counter is not None:
            self.counter.action(kind, result)

    def module_errors(self) -> dict[str, ModuleError]:
        """The failure holding each module back (the most recent one when several actions failed)."""
        out: dict[str, ModuleError] = {}
        failing = [
            (stats.last_failed_at, key, stats)
            for key, stats in self.stats.items()
            if stats.failures_in_row and stats.last_error is not None and stats.last_failed_at is not None
        ]
        for _, key, stats in sorted(failing, key=lambda item: (item[0], item[1])):
            module = key.split(" ", 1)[1]
            out[module] = ModuleError(
                key, stats.last_error or "", stats.failures_in_row, stats.retry_at(self.retry)
            )
        return out

    def reset(self) -> None:
        """Forget every statistic (a new desired state starts with a clean slate)."""
        self.stats.clear()
