"""Restart policy and back-off, as pure functions of an observation, a book and the time.

The rule is edgeAgent's: after ``n`` restarts the next one waits ``min(base_s * 2**n, max_s)``
from the module's last exit (or, for an unhealthy module, from its last restart), and ``n`` goes
back to 0 once the module has run healthy for ``reset_after_s``. Policies:

- ``always``: restart on any exit and when unhealthy;
- ``on-unhealthy``: restart on a failed exit (code not 0) and when unhealthy;
- ``on-failure``: restart on a failed exit only;
- ``never``: never restart.

An exit whose code is unknown (a killed process, a dead container) counts as failed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from agent.observed import ObservedModule
from modules.contract import RestartPolicy


@dataclass(frozen=True)
class BackoffConfig:
    """Capped exponential back-off: ``min(base_s * 2**n, max_s)`` seconds."""

    base_s: float = 10.0
    max_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.base_s > 0:
            raise ValueError(f"base_s must be positive, got {self.base_s}")
        if not self.max_s >= self.base_s:
            raise ValueError(f"max_s ({self.max_s}) must be at least base_s ({self.base_s})")


@dataclass(frozen=True)
class RestartPolicyConfig(BackoffConfig):
    """Back-off for module restarts, and how long a module must run healthy to reset its count."""

    reset_after_s: float = 600.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.reset_after_s > 0:
            raise ValueError(f"reset_after_s must be positive, got {self.reset_after_s}")


def backoff_delay(count: int, cfg: BackoffConfig) -> float:
    """Seconds to wait before the next attempt after ``count`` attempts: ``min(base·2^count, max)``."""
    if count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    return min(cfg.base_s * 2.0 ** min(count, 64), cfg.max_s)


@dataclass(frozen=True)
class RestartBook:
    """What the agent remembers about one module's restarts (stored durably in ``AgentState``).

    ``count``: restarts since the count was last reset; ``last_restart_at``: when the agent last
    restarted it; ``healthy_since``: since when it has been seen running and healthy without a
    break (``None`` when it is not, or when ``count`` is 0); ``stopped``: the agent stopped it on
    purpose (desired status ``stopped``), so its exit is not a failure.
    """

    count: int = 0
    last_restart_at: datetime | None = None
    healthy_since: datetime | None = None
    stopped: bool = False


@dataclass(frozen=True)
class RestartNow:
    """Restart the module now."""

    reason: str


@dataclass(frozen=True)
class WaitUntil:
    """The policy wants a restart, but back-off holds it until ``at``."""

    at: datetime
    reason: str


@dataclass(frozen=True)
class DontRestart:
    """No restart: the module is fine, or the policy does not restart it."""

    reason: str


Decision = RestartNow | WaitUntil | DontRestart


def refresh_book(
    book: RestartBook, observed: ObservedModule, now: datetime, cfg: RestartPolicyConfig, *, unhealthy: bool
) -> RestartBook:
    """Update ``healthy_since`` from this observation and reset ``count`` after a long healthy run.

    Only tracked while ``count`` is above 0 (there is nothing to reset otherwise), so a module
    that never restarted costs no bookkeeping writes. A module that exited is credited with the
    healthy run that ended at its exit, so a crash after a long healthy run restarts with a reset
    count even if no tick saw the reset happen.
    """
    if book.count == 0:
        return replace(book, healthy_since=None)
    reset_after = timedelta(seconds=cfg.reset_after_s)
    if observed.status == "running" and not unhealthy:
        since = book.healthy_since or now
        if now - since >= reset_after:
            return replace(book, count=0, healthy_since=None)
        return replace(book, healthy_since=since)
    ran_long = (
        book.healthy_since is not None
        and observed.finished_at is not None
        and observed.status in ("exited", "dead")
        and observed.finished_at - book.healthy_since >= reset_after
    )
    return replace(book, healthy_since=None, count=0 if ran_long else book.count)


def record_restart(book: RestartBook, now: datetime) -> RestartBook:
    """The book after the agent restarts the module at ``now``."""
    return replace(book, count=book.count + 1, last_restart_at=now, healthy_since=None, stopped=False)


def _describe_exit(observed: ObservedModule) -> str:
    if observed.status == "dead":
        return "container is dead"
    if observed.exit_code is None:
        return "exited (exit code unknown)"
    return f"exited with code {observed.exit_code}"


def _describe_unhealthy(observed: ObservedModule) -> str:
    error = observed.health.error if observed.health is not None else None
    text = f"unhealthy ({observed.health_failures} failed liveness probes in a row"
    return text + (f", last: {error})" if error else ")")


def should_restart(
    policy: RestartPolicy,
    observed: ObservedModule,
    book: RestartBook,
    now: datetime,
    cfg: RestartPolicyConfig,
    *,
    failure_threshold: int,
) -> Decision:
    """Whether ``policy`` restarts this module now, later (back-off), or not at all.

    ``book`` should already be refreshed for this observation (``refresh_book``).
    """
    if observed.status in ("exited", "dead"):
        what = _describe_exit(observed)
        failed = observed.status == "dead" or observed.exit_code != 0
        wanted = policy == "always" or (failed and policy in ("on-failure", "on-unhealthy"))
        since = observed.finished_at or book.last_restart_at
    elif observed.is_unhealthy(failure_threshold):
        what = _describe_unhealthy(observed)
        wanted = policy in ("always", "on-unhealthy")
        since = book.last_restart_at or observed.started_at
    else:
        return DontRestart(f"{observed.status}, not failed")
    if not wanted:
        return DontRestart(f"{what}; restart policy '{policy}' does not restart it")
    delay = backoff_delay(book.count, cfg)
    if since is None or now >= since + timedelta(seconds=delay):
        return RestartNow(f"{what}; restart #{book.count + 1} (policy '{policy}')")
    at = since + timedelta(seconds=delay)
    return WaitUntil(
        at,
        f"{what}; back-off {delay:g} s after {book.count} restarts, next restart at {at.isoformat()}",
    )
