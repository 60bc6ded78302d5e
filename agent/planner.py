"""The planner: (desired state, observation, restart books, time) → an ordered ``Plan``. Pure.

``plan`` is called on every tick with a fresh observation (level-based, like a Kubernetes
reconciler): it never remembers anything between calls, and the same inputs give the same plan.
Its rules, per module:

- desired, absent: ``pull`` when the image is missing (unless a pull is in flight or backing off
  after a failure), else ``create`` (+ ``start`` when its desired status is ``running``);
- desired, config changed (``config_hash``): the new image is pulled first while the old module
  keeps running (and restarting); once present: ``stop`` + ``remove`` + ``create`` (+ ``start``);
- download first, switch later: while any image of the desired state is missing, no module is
  replaced or removed (old modules keep serving, and restarting); the pulls run, and
  ``Plan.holding`` says how many images are still awaited; the switch comes when all are here.
  A module that is new (nothing of it runs) starts once its own image is here: it replaces nothing;
- desired status ``stopped``: ``stop`` when it runs;
- exited, or unhealthy: ``restart`` as its restart policy and back-off allow, else a ``wait``;
- observed but not desired: ``stop`` + ``remove`` (the runtime only shows this agent's modules).

Order: pulls first (the runner starts them in the background and moves on, so a long pull never
delays another module), then everything that stops or removes (modules that go away, then the
rest in reverse ``startup_order``) so ports are free, then creations, starts and restarts in
``startup_order`` (ties by name), then restart bookkeeping, then waits. ``desired=None`` means no
desired state is known yet: nothing is touched. ``module_status`` derives the reported status of
a module from the same inputs and the plan, so reports agree with what the agent does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from agent.actions import (
    Action,
    Create,
    Plan,
    Pull,
    Remove,
    Restart,
    SetRestartBook,
    Start,
    Stop,
    Wait,
)
from agent.observed import TRANSITIONAL, ImageAvailability, ObservedModule, config_hash
from agent.restart import (
    BackoffConfig,
    RestartBook,
    RestartNow,
    RestartPolicyConfig,
    WaitUntil,
    backoff_delay,
    record_restart,
    refresh_book,
    should_restart,
)
from modules.contract import (
    DesiredModule,
    DesiredState,
    ModuleStatus,
    RegistryCredentialRef,
    RuntimeStatus,
    registry_of,
)

NO_BOOK = RestartBook()


@dataclass(frozen=True)
class PlannerConfig:
    """Tunables: restart back-off and reset, and the back-off between failed pulls of an image."""

    restart: RestartPolicyConfig = field(default_factory=RestartPolicyConfig)
    pull_retry: BackoffConfig = field(default_factory=BackoffConfig)


def credentials_for(image: str, credentials: list[RegistryCredentialRef]) -> RegistryCredentialRef | None:
    """The credential reference for the registry ``image`` lives in, if the desired state has one."""
    registry = registry_of(image)
    return next((c for c in credentials if c.registry == registry), None)


@dataclass
class _Builder:
    """Collects actions by phase while modules are visited; ``build`` orders them."""

    generation: int | None = None
    pulls: dict[str, Action] = field(default_factory=dict)
    removals: list[Action] = field(default_factory=list)
    teardown: dict[tuple[int, str], list[Action]] = field(default_factory=dict)
    bringup: dict[tuple[int, str], list[Action]] = field(default_factory=dict)
    books: list[Action] = field(default_factory=list)
    waits: list[Action] = field(default_factory=list)
    holding: str | None = None

    def build(self) -> Plan:
        actions: list[Action] = list(self.pulls.values())
        actions += self.removals
        for key in sorted(self.teardown, reverse=True):
            actions += self.teardown[key]
        for key in sorted(self.bringup):
            actions += self.bringup[key]
        return Plan(tuple(actions + self.books + self.waits), holding=self.holding)


def plan(
    desired: DesiredState | None,
    observed: Mapping[str, ObservedModule],
    images: ImageAvailability,
    books: Mapping[str, RestartBook],
    now: datetime,
    cfg: PlannerConfig | None = None,
) -> Plan:
    """The actions that move ``observed`` toward ``desired`` now, in the order to run them."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware (use modules.contract.utcnow())")
    if desired is None:
        return Plan()
    cfg = cfg or PlannerConfig()
    out = _Builder(generation=desired.generation)
    wanted = sorted({m.image for m in desired.modules.values()})
    missing = [image for image in wanted if not images.is_present(image)]
    if missing:
        out.holding = (
            f"waiting for {len(missing)} of {len(wanted)} images of generation {desired.generation} "
            "before switching"
        )
    ordered = sorted(desired.modules.items(), key=lambda kv: (kv[1].startup_order, kv[0]))
    for name, module in ordered:
        _plan_module(
            name,
            module,
            observed.get(name),
            images,
            books.get(name, NO_BOOK),
            now,
            cfg,
            desired.registry_credentials,
            out,
        )
    for name in sorted(observed.keys() - desired.modules.keys()):
        if out.holding is None:  # a module that goes away keeps serving until the switch
            _plan_removal(observed[name], name in books, out)
    for name in sorted(books.keys() - desired.modules.keys() - observed.keys()):
        out.books.append(SetRestartBook(module=name, book=None, reason="module is gone"))
    return out.build()


def _plan_removal(o: ObservedModule, has_book: bool, out: _Builder) -> None:
    if o.status == "removing":
        return
    why = "not in the desired state"
    if o.is_running:
        out.removals.append(Stop(module=o.name, reason=why))
    out.removals.append(Remove(module=o.name, reason=why))
    if has_book:
        out.removals.append(SetRestartBook(module=o.name, book=None, reason="module removed"))


def _plan_module(
    name: str,
    m: DesiredModule,
    o: ObservedModule | None,
    images: ImageAvailability,
    book: RestartBook,
    now: datetime,
    cfg: PlannerConfig,
    credentials: list[RegistryCredentialRef],
    out: _Builder,
) -> None:
    key = (m.startup_order, name)
    if o is not None and o.status == "removing":
        return
    want_hash = config_hash(m)
    replace_it = o is None or o.config_hash != want_hash
    if replace_it and not images.is_present(m.image):
        _pull(name, m.image, images, now, cfg, credentials, keeping_old=o is not None, out=out)
    switch_held = out.holding is not None and o is not None  # a running version waits for all images
    if replace_it and (switch_held or not images.is_present(m.image)):
        if o is None or o.status == "dead":
            return
        replace_it = False  # the current module keeps running (and restarting) until all images are here
    if replace_it:
        _recreate(name, m, o, want_hash, book, key, out)
        return
    assert o is not None
    if m.desired_status == "stopped":
        _keep_stopped(name, o, book, key, out)
        return
    if o.status in TRANSITIONAL:
        return
    _keep_running(name, m, o, want_hash, book, now, cfg, key, out)


def _pull(
    name: str,
    image: str,
    images: ImageAvailability,
    now: datetime,
    cfg: PlannerConfig,
    credentials: list[RegistryCredentialRef],
    *,
    keeping_old: bool,
    out: _Builder,
) -> None:
    if image in out.pulls or images.is_pulling(image):
        return
    failure = images.failed.get(image)
    if failure is not None:
        retry_at = failure.failed_at + timedelta(
            seconds=backoff_delay(max(failure.attempts - 1, 0), cfg.pull_retry)
        )
        last = f"{failure.attempts} failed pulls of {image}, last: {failure.error}"
        if now < retry_at:
            out.waits.append(
                Wait(module=name, until=retry_at, reason=f"{last}; retry at {retry_at.isoformat()}")
            )
            return
        reason = f"retrying after {last}"
    else:
        reason = f"image {image} is not present"
    if keeping_old:
        reason += "; the current version keeps running meanwhile"
    out.pulls[image] = Pull(
        module=name, image=image, credentials=credentials_for(image, credentials), reason=reason
    )


def _recreate(
    name: str,
    m: DesiredModule,
    o: ObservedModule | None,
    want_hash: str,
    book: RestartBook,
    key: tuple[int, str],
    out: _Builder,
) -> None:
    steps = out.bringup.setdefault(key, [])
    if o is None:
        why = "not created yet"
    else:
        why = f"image changed from {o.image} to {m.image}" if o.image != m.image else "configuration changed"
        teardown = out.teardown.setdefault(key, [])
        if o.is_running:
            teardown.append(Stop(module=name, reason=why))
        teardown.append(Remove(module=name, reason=why))
        if book != NO_BOOK:
            steps.append(SetRestartBook(module=name, book=NO_BOOK, reason=f"fresh start: {why}"))
    steps.append(Create(module=name, spec=m, config_hash=want_hash, generation=out.generation, reason=why))
    if m.desired_status == "running":
        steps.append(Start(module=name, reason=why))


def _keep_stopped(
    name: str, o: ObservedModule, book: RestartBook, key: tuple[int, str], out: _Builder
) -> None:
    why = "desired status is stopped"
    if o.is_running:
        out.teardown.setdefault(key, []).append(Stop(module=name, reason=why))
    if not book.stopped:
        out.books.append(
            SetRestartBook(module=name, book=replace(book, stopped=True, healthy_since=None), reason=why)
        )


def _keep_running(
    name: str,
    m: DesiredModule,
    o: ObservedModule,
    want_hash: str,
    book: RestartBook,
    now: datetime,
    cfg: PlannerConfig,
    key: tuple[int, str],
    out: _Builder,
) -> None:
    unhealthy = o.is_unhealthy(m.health.failure_threshold)
    fresh = replace(refresh_book(book, o, now, cfg.restart, unhealthy=unhealthy), stopped=False)
    if o.status == "created" or (book.stopped and o.status in ("exited", "dead")):
        why = "desired status is running again" if book.stopped else "created, not started yet"
        steps = out.bringup.setdefault(key, [])
        if fresh != book:
            steps.append(SetRestartBook(module=name, book=fresh, reason=why))
        steps += _start_again(name, m, o, want_hash, why, key, out, resume=True)
        return
    decision = should_restart(
        m.restart_policy, o, fresh, now, cfg.restart, failure_threshold=m.health.failure_threshold
    )
    if isinstance(decision, RestartNow):
        restarted = record_restart(fresh, now)
        steps = out.bringup.setdefault(key, [])
        steps.append(SetRestartBook(module=name, book=restarted, reason=decision.reason))
        steps += _start_again(name, m, o, want_hash, decision.reason, key, out, resume=False)
        return
    if fresh != book:
        out.books.append(SetRestartBook(module=name, book=fresh, reason=_book_change(book, fresh)))
    if isinstance(decision, WaitUntil):
        out.waits.append(Wait(module=name, until=decision.at, reason=decision.reason))


def _start_again(
    name: str,
    m: DesiredModule,
    o: ObservedModule,
    want_hash: str,
    why: str,
    key: tuple[int, str],
    out: _Builder,
    *,
    resume: bool,
) -> list[Action]:
    """``start`` (resume) or ``restart`` in place, or recreate a dead container (it cannot start)."""
    if o.status == "dead":
        out.teardown.setdefault(key, []).append(Remove(module=name, reason=why))
        return [
            Create(module=name, spec=m, config_hash=want_hash, generation=out.generation, reason=why),
            Start(module=name, reason=why),
        ]
    return [Start(module=name, reason=why)] if resume else [Restart(module=name, reason=why)]


def _book_change(old: RestartBook, new: RestartBook) -> str:
    if old.stopped and not new.stopped:
        return "desired status is running again"
    if new.count < old.count:
        return f"ran healthy long enough: restart count {old.count} reset to 0"
    if new.healthy_since is not None and old.healthy_since is None:
        return "running and healthy"
    return "no longer running healthy"


_RETRY_KINDS = {"exited": ("wait", "restart"), "dead": ("wait", "create")}


def module_status(
    name: str,
    m: DesiredModule,
    o: ObservedModule | None,
    images: ImageAvailability,
    book: RestartBook,
    planned: Plan,
) -> ModuleStatus:
    """The reported status of desired module ``name``, consistent with what ``planned`` does about it.

    ``planned`` is this tick's plan: a ``wait`` or ``restart`` for an exited module means
    ``backoff``; a planned or in-flight pull of a module not created yet means ``pulling``; a pull
    backing off after a failure means ``failed`` with the pull error as the message.
    """
    actions = planned.for_module(name)
    pulling = images.is_pulling(m.image) or any(isinstance(a, Pull) and a.image == m.image for a in planned)
    failure = images.failed.get(m.image) if not images.is_present(m.image) else None
    progress = images.progress.get(m.image) if pulling else None
    message: str | None = None
    if failure is not None and not pulling:
        message = f"pull of {m.image} failed: {failure.error}"
    held = planned.holding is not None and o is not None and o.config_hash != config_hash(m)
    if o is None:
        status: RuntimeStatus = "pulling" if pulling else "failed" if failure is not None else "stopped"
        return ModuleStatus(runtime_status=status, image=m.image, message=message, pull=progress)
    if pulling and o.config_hash != config_hash(m):
        message = f"runs {o.image} while pulling {m.image}"
    elif held and message is None:
        message = f"runs {o.image}: {planned.holding}"
    if o.status == "running":
        status = "unhealthy" if o.is_unhealthy(m.health.failure_threshold) else "running"
    elif o.status == "created":
        status = "created"
    elif o.status == "restarting":
        status = "backoff"
    elif o.status in ("exited", "dead") and (
        retry := [a for a in actions if a.kind in _RETRY_KINDS[o.status]]
    ):
        status, message = "backoff", retry[0].reason
    elif o.status in ("exited", "dead") and not (m.desired_status == "stopped" or book.stopped):
        status = "stopped" if o.exit_code == 0 else "failed"
    else:
        status = "stopped"
    return ModuleStatus(
        runtime_status=status,
        exit_code=o.exit_code,
        restart_count=book.count,
        last_start=o.started_at,
        image=o.image,
        image_digest=o.image_id,
        health=o.health,
        message=message,
        pull=progress,
    )
