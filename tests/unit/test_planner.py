"""Table tests of the pure planner: each row states inputs and the exact ordered (kind, module) list."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from agent.actions import Create, Plan, Pull, SetRestartBook, Wait
from agent.observed import ImageAvailability, ObservedModule, PullFailure, config_hash
from agent.planner import PlannerConfig, credentials_for, module_status, plan
from agent.restart import RestartBook, RestartPolicyConfig
from modules.contract import (
    Batching,
    DesiredModule,
    DesiredState,
    ModuleHealth,
    PullProgress,
    RegistryCredentialRef,
    registry_of,
)

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
OLD = NOW - timedelta(hours=1)
WEB1 = "localhost:5000/web:1"
WEB2 = "localhost:5000/web:2"
API1 = "localhost:5000/api:1"


def mod(image: str = WEB1, **kw: Any) -> DesiredModule:
    return DesiredModule(image=image, **kw)


def desired(modules: dict[str, DesiredModule], **kw: Any) -> DesiredState:
    fields: dict[str, Any] = {"generation": 1, **kw}
    return DesiredState(
        device_id="dev1", issued_at=OLD, expires_at=NOW + timedelta(days=1), modules=modules, **fields
    )


def seen(name: str, m: DesiredModule, status: str = "running", **kw: Any) -> ObservedModule:
    """An observation of ``name`` created from ``m`` (same image and config hash unless overridden)."""
    kw.setdefault("started_at", OLD)
    if status in ("exited", "dead"):
        kw.setdefault("exit_code", 1)
        kw.setdefault("finished_at", OLD + timedelta(minutes=1))
    return ObservedModule(
        name=name,
        image=kw.pop("image", m.image),
        status=status,  # type: ignore[arg-type]
        config_hash=kw.pop("config_hash", config_hash(m)),
        **kw,
    )


def unhealthy(failures: int = 3) -> dict[str, Any]:
    return {
        "health": ModuleHealth(live=False, ready=False, error="connection refused"),
        "health_failures": failures,
    }


@dataclass
class Row:
    """One planner case: desired modules, observations, images, books → expected (kind, module)s."""

    modules: dict[str, DesiredModule] | None
    observed: list[ObservedModule] = field(default_factory=list)
    present: set[str] = field(default_factory=set)
    pulling: set[str] = field(default_factory=set)
    failed: dict[str, PullFailure] = field(default_factory=dict)
    books: dict[str, RestartBook] = field(default_factory=dict)
    expect: list[tuple[str, str]] = field(default_factory=list)

    def run(self) -> Plan:
        return plan(
            desired(self.modules) if self.modules is not None else None,
            {o.name: o for o in self.observed},
            ImageAvailability(present=self.present, pulling=self.pulling, failed=self.failed),
            self.books,
            NOW,
        )


web = mod()
web_stopped = mod(desired_status="stopped")
web_on_failure = mod(restart_policy="on-failure")
web_on_unhealthy = mod(restart_policy="on-unhealthy")
web_never = mod(restart_policy="never")
ordered_a = mod(API1, startup_order=0)
ordered_b = mod(WEB1, startup_order=1)
BOOKED = RestartBook(count=2, last_restart_at=OLD)
STOPPED_BOOK = RestartBook(stopped=True)

ROWS = {
    # --- nothing to do -----------------------------------------------------------------------
    "no desired state known: touch nothing": Row(None, [seen("web", web)], expect=[]),
    "empty desired, nothing running": Row({}, expect=[]),
    "running, same config, healthy": Row({"web": web}, [seen("web", web)], {WEB1}, expect=[]),
    "restart policy change does not recreate": Row({"web": web_never}, [seen("web", web)], {WEB1}, expect=[]),
    "startup order / health change does not recreate": Row(
        {"web": mod(startup_order=5, health={"interval_s": 1})}, [seen("web", web)], {WEB1}, expect=[]
    ),
    # --- new modules ---------------------------------------------------------------------------
    "new, image missing: pull only": Row({"web": web}, expect=[("pull", "web")]),
    "new, image already pulling: nothing": Row({"web": web}, pulling={WEB1}, expect=[]),
    "new, image present: create + start": Row(
        {"web": web}, present={WEB1}, expect=[("create", "web"), ("start", "web")]
    ),
    "new, desired stopped: create only": Row(
        {"web": web_stopped}, present={WEB1}, expect=[("create", "web")]
    ),
    "new, ordered by startup_order then name": Row(
        {"b": ordered_b, "a": ordered_a, "c": mod(API1, startup_order=1)},
        present={WEB1, API1},
        expect=[
            ("create", "a"),
            ("start", "a"),
            ("create", "b"),
            ("start", "b"),
            ("create", "c"),
            ("start", "c"),
        ],
    ),
    "one pull per image, in startup order": Row(
        {"b": ordered_b, "a": mod(WEB1, startup_order=0)}, expect=[("pull", "a")]
    ),
    "pull failed recently: wait": Row(
        {"web": web},
        failed={WEB1: PullFailure("registry unreachable", NOW - timedelta(seconds=3))},
        expect=[("wait", "web")],
    ),
    "pull failed long ago: pull again": Row(
        {"web": web},
        failed={WEB1: PullFailure("registry unreachable", OLD, attempts=4)},
        expect=[("pull", "web")],
    ),
    # --- changed modules -----------------------------------------------------------------------
    "image changed, new image missing: pull, old keeps running": Row(
        {"web": mod(WEB2)}, [seen("web", web)], {WEB1}, expect=[("pull", "web")]
    ),
    "image changed, new image pulling: old keeps running": Row(
        {"web": mod(WEB2)}, [seen("web", web)], {WEB1}, pulling={WEB2}, expect=[]
    ),
    "image changed, new image present: stop, remove, create, start": Row(
        {"web": mod(WEB2)},
        [seen("web", web)],
        {WEB1, WEB2},
        expect=[("stop", "web"), ("remove", "web"), ("create", "web"), ("start", "web")],
    ),
    "env changed: recreate": Row(
        {"web": mod(env={"A": "1"})},
        [seen("web", web)],
        {WEB1},
        expect=[("stop", "web"), ("remove", "web"), ("create", "web"), ("start", "web")],
    ),
    "changed while exited: no stop before remove": Row(
        {"web": mod(WEB2)},
        [seen("web", web, "exited")],
        {WEB2},
        expect=[("remove", "web"), ("create", "web"), ("start", "web")],
    ),
    "recreate resets the restart book": Row(
        {"web": mod(WEB2)},
        [seen("web", web)],
        {WEB2},
        books={"web": BOOKED},
        expect=[
            ("stop", "web"),
            ("remove", "web"),
            ("set_restart_book", "web"),
            ("create", "web"),
            ("start", "web"),
        ],
    ),
    "old version crashed while the new image pulls: restart the old one": Row(
        {"web": mod(WEB2)},
        [seen("web", web, "exited")],
        {WEB1},
        pulling={WEB2},
        expect=[("set_restart_book", "web"), ("restart", "web")],
    ),
    # --- desired status ------------------------------------------------------------------------
    "desired stopped, running: stop and remember": Row(
        {"web": web_stopped},
        [seen("web", web)],
        {WEB1},
        expect=[("stop", "web"), ("set_restart_book", "web")],
    ),
    "desired stopped, already stopped by us: nothing": Row(
        {"web": web_stopped},
        [seen("web", web, "exited", exit_code=0)],
        {WEB1},
        books={"web": STOPPED_BOOK},
        expect=[],
    ),
    "desired running again after a stop: start, no restart counted": Row(
        {"web": web},
        [seen("web", web, "exited", exit_code=143)],
        {WEB1},
        books={"web": STOPPED_BOOK},
        expect=[("set_restart_book", "web"), ("start", "web")],
    ),
    "created but never started: start": Row(
        {"web": web}, [seen("web", web, "created")], {WEB1}, expect=[("start", "web")]
    ),
    # --- restarts ------------------------------------------------------------------------------
    "crashed long ago, always: record + restart": Row(
        {"web": web},
        [seen("web", web, "exited")],
        {WEB1},
        expect=[("set_restart_book", "web"), ("restart", "web")],
    ),
    "crashed 3 s ago, first back-off 10 s: wait": Row(
        {"web": web},
        [seen("web", web, "exited", finished_at=NOW - timedelta(seconds=3))],
        {WEB1},
        expect=[("wait", "web")],
    ),
    "clean exit, on-failure: leave it": Row(
        {"web": web_on_failure}, [seen("web", web_on_failure, "exited", exit_code=0)], {WEB1}, expect=[]
    ),
    "clean exit, always: restart": Row(
        {"web": web},
        [seen("web", web, "exited", exit_code=0)],
        {WEB1},
        expect=[("set_restart_book", "web"), ("restart", "web")],
    ),
    "crash, never: leave it": Row({"web": web_never}, [seen("web", web_never, "exited")], {WEB1}, expect=[]),
    "unhealthy, always: restart": Row(
        {"web": web},
        [seen("web", web, **unhealthy())],
        {WEB1},
        expect=[("set_restart_book", "web"), ("restart", "web")],
    ),
    "unhealthy, on-unhealthy: restart": Row(
        {"web": web_on_unhealthy},
        [seen("web", web_on_unhealthy, **unhealthy())],
        {WEB1},
        expect=[("set_restart_book", "web"), ("restart", "web")],
    ),
    "unhealthy, on-failure: leave it": Row(
        {"web": web_on_failure}, [seen("web", web_on_failure, **unhealthy())], {WEB1}, expect=[]
    ),
    "failures below threshold: leave it": Row(
        {"web": web}, [seen("web", web, **unhealthy(2))], {WEB1}, expect=[]
    ),
    "not live while starting (the prober counts nothing in the start period): leave it": Row(
        {"web": web}, [seen("web", web, started_at=NOW - timedelta(seconds=40), **unhealthy(0))], {WEB1}
    ),
    "not live past the start period, threshold reached: restart": Row(
        {"web": web},
        [seen("web", web, started_at=NOW - timedelta(seconds=140), **unhealthy(3))],
        {WEB1},
        expect=[("set_restart_book", "web"), ("restart", "web")],
    ),
    "unhealthy right after a restart: wait for back-off": Row(
        {"web": web},
        [seen("web", web, started_at=NOW - timedelta(seconds=15), **unhealthy())],
        {WEB1},
        books={"web": RestartBook(count=2, last_restart_at=NOW - timedelta(seconds=15))},
        expect=[("wait", "web")],
    ),
    "dead container: remove, create, start": Row(
        {"web": web},
        [seen("web", web, "dead")],
        {WEB1},
        expect=[("remove", "web"), ("set_restart_book", "web"), ("create", "web"), ("start", "web")],
    ),
    "transitional states are left to settle": Row(
        {"a": mod(), "b": mod(), "c": mod()},
        [seen("a", web, "restarting"), seen("b", web, "paused"), seen("c", web, "removing")],
        {WEB1},
        expect=[],
    ),
    # --- removals ------------------------------------------------------------------------------
    "not desired, running: stop + remove": Row(
        {}, [seen("old", web)], expect=[("stop", "old"), ("remove", "old")]
    ),
    "not desired, exited: remove": Row({}, [seen("old", web, "exited")], expect=[("remove", "old")]),
    "not desired, with a book: forget it": Row(
        {},
        [seen("old", web)],
        books={"old": BOOKED},
        expect=[("stop", "old"), ("remove", "old"), ("set_restart_book", "old")],
    ),
    "stale book of a vanished module: forget it": Row(
        {}, books={"gone": BOOKED}, expect=[("set_restart_book", "gone")]
    ),
    # --- ordering ------------------------------------------------------------------------------
    "stops in reverse startup order, starts in order": Row(
        {"a": mod(API1, startup_order=0, env={"V": "2"}), "b": mod(WEB1, startup_order=1, env={"V": "2"})},
        [seen("a", ordered_a), seen("b", ordered_b)],
        {WEB1, API1},
        expect=[
            ("stop", "b"),
            ("remove", "b"),
            ("stop", "a"),
            ("remove", "a"),
            ("create", "a"),
            ("start", "a"),
            ("create", "b"),
            ("start", "b"),
        ],
    ),
    "removals before creations (ports are freed first)": Row(
        {"new": mod(API1, ports=[{"container": 5001, "host": 8080}])},
        [seen("old", mod(ports=[{"container": 5001, "host": 8080}]))],
        {API1},
        expect=[("stop", "old"), ("remove", "old"), ("create", "new"), ("start", "new")],
    ),
    "a pull never holds back another module's restart": Row(
        {"a": mod(API1, startup_order=0), "b": mod(WEB1, startup_order=1)},
        [seen("b", ordered_b, "exited")],
        {WEB1},
        pulling={API1},
        expect=[("set_restart_book", "b"), ("restart", "b")],
    ),
    "pulls come first, then a new module whose image is here starts (it replaces nothing)": Row(
        {"a": mod(API1, startup_order=1), "b": mod(WEB1, startup_order=0)},
        present={WEB1},
        expect=[("pull", "a"), ("create", "b"), ("start", "b")],
    ),
    # --- download first, switch later: a generation switches only when all its images are here --
    "update of two, one image here: pull the other, both old keep running": Row(
        {"web": mod(WEB2), "api": mod(API1, env={"V": "2"})},
        [seen("web", web), seen("api", mod(API1))],
        present={WEB1, API1},
        expect=[("pull", "web")],
    ),
    "update of two, all images here: switch both": Row(
        {"web": mod(WEB2), "api": mod(API1, env={"V": "2"})},
        [seen("web", web), seen("api", mod(API1))],
        present={WEB1, WEB2, API1},
        expect=[
            ("stop", "web"),
            ("remove", "web"),
            ("stop", "api"),
            ("remove", "api"),
            ("create", "api"),
            ("start", "api"),
            ("create", "web"),
            ("start", "web"),
        ],
    ),
    "module dropped while another's image downloads: it keeps serving": Row(
        {"web": mod(WEB2)},
        [seen("web", web), seen("api", mod(API1))],
        present={WEB1, API1},
        expect=[("pull", "web")],
    ),
    "module dropped, all images here: removed at the switch": Row(
        {"web": mod(WEB2)},
        [seen("web", web), seen("api", mod(API1))],
        present={WEB1, WEB2, API1},
        expect=[
            ("stop", "api"),
            ("remove", "api"),
            ("stop", "web"),
            ("remove", "web"),
            ("create", "web"),
            ("start", "web"),
        ],
    ),
    "new module beside an update whose image is missing: it starts, the update waits": Row(
        {"web": mod(WEB2), "api": mod(API1)},
        [seen("web", web)],
        present={WEB1, API1},
        expect=[("pull", "web"), ("create", "api"), ("start", "api")],
    ),
    "held old module still restarts under its policy": Row(
        {"web": mod(WEB2), "api": mod(API1)},
        [seen("web", web, "exited", finished_at=NOW - timedelta(hours=1)), seen("api", mod(API1))],
        present={WEB1, API1},
        expect=[("pull", "web"), ("set_restart_book", "web"), ("restart", "web")],
    ),
    "restart books and waits come last": Row(
        {"a": mod(API1, startup_order=0), "b": mod(WEB1, startup_order=1)},
        [
            seen("a", ordered_a, "exited", finished_at=NOW - timedelta(seconds=1)),
            seen("b", ordered_b),
        ],
        {WEB1, API1},
        books={"b": BOOKED},
        expect=[("set_restart_book", "b"), ("wait", "a")],
    ),
}


@pytest.mark.parametrize("row", ROWS.values(), ids=ROWS.keys())
def test_plan(row: Row) -> None:
    result = row.run()
    assert [(a.kind, a.module) for a in result] == row.expect
    assert all(a.reason for a in result), "every action says why"


def test_same_inputs_same_plan() -> None:
    row = ROWS["stops in reverse startup order, starts in order"]
    assert row.run() == row.run()


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        plan(desired({}), {}, ImageAvailability(), {}, datetime(2026, 1, 1))


def test_create_carries_spec_and_config_hash() -> None:
    m = mod(env={"MODEL": "resnet"})
    (create, _start) = plan(desired({"web": m}), {}, ImageAvailability(present={WEB1}), {}, NOW).actions
    assert isinstance(create, Create)
    assert create.spec == m
    assert create.config_hash == config_hash(m)
    assert create.generation == 1  # the desired state's, for the runtime's label


def test_the_config_hash_of_modules_without_batching_is_what_it_was_before_the_field() -> None:
    """An upgraded agent must not recreate every running module because the contract grew."""
    import hashlib

    from modules.contract import canonical_json

    m = mod(env={"MODEL": "resnet"})
    before = m.model_dump(mode="json", include={"image", "profile", "env", "ports", "resources"})
    assert config_hash(m) == hashlib.sha256(canonical_json(before)).hexdigest()
    tuned = m.model_copy(update={"batching": Batching(max_batch_size=4)})
    assert config_hash(tuned) != config_hash(m), "changing batching recreates the module"


def test_recreating_a_dead_container_carries_the_generation() -> None:
    o = seen("web", web, "dead")
    actions = plan(
        desired({"web": web}, generation=7), {"web": o}, ImageAvailability(present={WEB1}), {}, NOW
    )
    creates = [a for a in actions if isinstance(a, Create)]
    assert [c.generation for c in creates] == [7]


def test_pull_carries_the_credentials_of_its_registry() -> None:
    creds = [
        RegistryCredentialRef(registry="other.example:5000", secret="other"),
        RegistryCredentialRef(registry="localhost:5000", secret="local"),
    ]
    state = desired({"web": web}, registry_credentials=creds)
    (pull,) = plan(state, {}, ImageAvailability(), {}, NOW).actions
    assert isinstance(pull, Pull)
    assert (pull.image, pull.credentials) == (WEB1, creds[1])


@pytest.mark.parametrize(
    ("image", "registry"),
    [
        ("localhost:5000/web:1", "localhost:5000"),
        ("localhost/web", "localhost"),
        ("registry.example.com/team/web@sha256:" + "a" * 64, "registry.example.com"),
        ("library/python:3.11", "docker.io"),
        ("python", "docker.io"),
    ],
)
def test_registry_of(image: str, registry: str) -> None:
    assert registry_of(image) == registry


def test_no_credentials_for_an_unlisted_registry() -> None:
    assert (
        credentials_for("python:3.11", [RegistryCredentialRef(registry="localhost:5000", secret="s")]) is None
    )


def test_restart_records_the_attempt_before_restarting() -> None:
    result = ROWS["crashed long ago, always: record + restart"].run()
    book_action = result.actions[0]
    assert isinstance(book_action, SetRestartBook)
    assert book_action.book == RestartBook(count=1, last_restart_at=NOW)


def test_back_off_grows_with_the_restart_count() -> None:
    finished = NOW - timedelta(seconds=30)
    m = {"web": web}
    o = {"web": seen("web", web, "exited", finished_at=finished)}
    img = ImageAvailability(present={WEB1})
    after_two = plan(desired(m), o, img, {"web": RestartBook(count=2, last_restart_at=OLD)}, NOW)
    (wait,) = after_two.actions
    assert isinstance(wait, Wait)
    assert wait.until == finished + timedelta(seconds=40)
    assert after_two.wake_at == wait.until
    assert after_two.is_empty
    after_one = plan(desired(m), o, img, {"web": RestartBook(count=1, last_restart_at=OLD)}, NOW)
    assert [a.kind for a in after_one] == ["set_restart_book", "restart"]


def test_back_off_numbers_are_configurable() -> None:
    o = {"web": seen("web", web, "exited", finished_at=NOW - timedelta(seconds=3))}
    cfg = PlannerConfig(restart=RestartPolicyConfig(base_s=1, max_s=2))
    result = plan(desired({"web": web}), o, ImageAvailability(present={WEB1}), {}, NOW, cfg)
    assert [a.kind for a in result] == ["set_restart_book", "restart"]


def test_pull_retry_waits_per_attempt() -> None:
    failed_at = NOW - timedelta(seconds=30)
    img = ImageAvailability(failed={WEB1: PullFailure("timeout", failed_at, attempts=3)})
    (wait,) = plan(desired({"web": web}), {}, img, {}, NOW).actions
    assert isinstance(wait, Wait)
    assert wait.until == failed_at + timedelta(seconds=40)
    assert "timeout" in wait.reason


def test_healthy_run_is_booked_then_resets_the_count() -> None:
    o = {"web": seen("web", web)}
    img = ImageAvailability(present={WEB1})
    first = plan(desired({"web": web}), o, img, {"web": BOOKED}, NOW)
    (started,) = first.actions
    assert isinstance(started, SetRestartBook)
    assert started.book == RestartBook(count=2, last_restart_at=OLD, healthy_since=NOW)
    assert started.book is not None
    later = NOW + timedelta(minutes=10)
    (reset,) = plan(desired({"web": web}), o, img, {"web": started.book}, later).actions
    assert isinstance(reset, SetRestartBook)
    assert reset.book == RestartBook(count=0, last_restart_at=OLD)
    assert "reset" in reset.reason


def test_reasons_name_what_changed() -> None:
    result = ROWS["image changed, new image present: stop, remove, create, start"].run()
    assert all(a.reason == f"image changed from {WEB1} to {WEB2}" for a in result)
    (pull,) = ROWS["image changed, new image missing: pull, old keeps running"].run().actions
    assert "keeps running" in pull.reason


def test_plan_renders_one_line_per_action() -> None:
    text = str(ROWS["new, image present: create + start"].run())
    assert text.splitlines() == ["create web: not created yet", "start web: not created yet"]
    assert str(Plan()) == "(nothing to do)"


STATUS = {
    # row name in ROWS → (module, expected runtime_status, expected message or None)
    "new, image missing: pull only": ("web", "pulling", None),
    "new, image already pulling: nothing": ("web", "pulling", None),
    "pull failed recently: wait": ("web", "failed", f"pull of {WEB1} failed: registry unreachable"),
    "new, image present: create + start": ("web", "stopped", None),
    "running, same config, healthy": ("web", "running", None),
    "unhealthy, on-failure: leave it": ("web", "unhealthy", None),
    "not live while starting (the prober counts nothing in the start period): leave it": (
        "web",
        "running",
        None,
    ),
    "created but never started: start": ("web", "created", None),
    "crashed 3 s ago, first back-off 10 s: wait": ("web", "backoff", "back-off 10 s after 0 restarts"),
    "crashed long ago, always: record + restart": ("web", "backoff", "restart #1 (policy 'always')"),
    "dead container: remove, create, start": ("web", "backoff", "container is dead"),
    "crash, never: leave it": ("web", "failed", None),
    "clean exit, on-failure: leave it": ("web", "stopped", None),
    "desired stopped, already stopped by us: nothing": ("web", "stopped", None),
    "image changed, new image pulling: old keeps running": (
        "web",
        "running",
        f"runs {WEB1} while pulling {WEB2}",
    ),
    "new module beside an update whose image is missing: it starts, the update waits": (
        "web",
        "running",
        f"runs {WEB1} while pulling {WEB2}",
    ),
    "update of two, one image here: pull the other, both old keep running": (
        "api",
        "running",
        "waiting for 1 of 2 images",
    ),
}


@pytest.mark.parametrize(("row_name", "expected"), STATUS.items(), ids=STATUS.keys())
def test_module_status(row_name: str, expected: tuple[str, str, str | None]) -> None:
    row = ROWS[row_name]
    name, runtime_status, message = expected
    assert row.modules is not None
    images = ImageAvailability(present=row.present, pulling=row.pulling, failed=row.failed)
    observed = {o.name: o for o in row.observed}
    status = module_status(
        name, row.modules[name], observed.get(name), images, row.books.get(name, RestartBook()), row.run()
    )
    assert status.runtime_status == runtime_status
    if message is None:
        assert status.message is None
    else:
        assert status.message is not None and message in status.message


def test_module_status_carries_counts_and_image() -> None:
    o = seen("web", web, image_id="sha256:" + "b" * 64, started_at=OLD)
    book = RestartBook(count=3, last_restart_at=OLD)
    img = ImageAvailability(present={WEB1})
    status = module_status(
        "web", web, o, img, book, plan(desired({"web": web}), {"web": o}, img, {"web": book}, NOW)
    )
    assert (status.restart_count, status.last_start, status.image, status.image_digest) == (
        3,
        OLD,
        WEB1,
        "sha256:" + "b" * 64,
    )


def test_started_by_hand_after_a_stop_clears_the_stopped_mark() -> None:
    (forget,) = plan(
        desired({"web": web}),
        {"web": seen("web", web)},
        ImageAvailability(present={WEB1}),
        {"web": STOPPED_BOOK},
        NOW,
    ).actions
    assert isinstance(forget, SetRestartBook)
    assert (forget.book, forget.reason) == (RestartBook(), "desired status is running again")


def test_created_while_stopped_then_wanted_running() -> None:
    result = plan(
        desired({"web": web}),
        {"web": seen("web", web, "created")},
        ImageAvailability(present={WEB1}),
        {"web": STOPPED_BOOK},
        NOW,
    )
    assert [(a.kind, a.module) for a in result] == [("set_restart_book", "web"), ("start", "web")]


class FakeDevice:
    """A recording fake runtime: applies actions to in-memory observations (pulls finish at once)."""

    def __init__(self) -> None:
        self.modules: dict[str, ObservedModule] = {}
        self.present: set[str] = set()
        self.books: dict[str, RestartBook] = {}
        self.log: list[tuple[str, str]] = []

    def tick(self, state: DesiredState, now: datetime) -> Plan:
        result = plan(state, self.modules, ImageAvailability(present=self.present), self.books, now)
        for a in result:
            if a.kind != "wait":
                self.log.append((a.kind, a.module))
            if isinstance(a, Pull):
                self.present.add(a.image)
            elif isinstance(a, Create):
                self.modules[a.module] = ObservedModule(
                    name=a.module, image=a.spec.image, status="created", config_hash=a.config_hash
                )
            elif a.kind in ("start", "restart"):
                up = ModuleHealth(live=True, ready=True)
                self.modules[a.module] = replace(
                    self.modules[a.module], status="running", started_at=now, health=up
                )
            elif a.kind == "stop":
                self.modules[a.module] = replace(
                    self.modules[a.module], status="exited", exit_code=0, finished_at=now
                )
            elif a.kind == "remove":
                del self.modules[a.module]
            elif isinstance(a, SetRestartBook):
                if a.book is None:
                    self.books.pop(a.module, None)
                else:
                    self.books[a.module] = a.book
        return result

    def converge(self, state: DesiredState, now: datetime) -> list[tuple[str, str]]:
        self.log = []
        for _ in range(10):
            if self.tick(state, now).is_empty:
                return self.log
        raise AssertionError(f"no convergence: {self.log}")


def test_scenario_install_crash_update_remove() -> None:
    device = FakeDevice()
    a, b = mod(API1, startup_order=0), mod(WEB1, startup_order=1)
    gen1 = desired({"a": a, "b": b})
    assert device.converge(gen1, NOW) == [
        ("pull", "a"),
        ("pull", "b"),
        ("create", "a"),
        ("start", "a"),
        ("create", "b"),
        ("start", "b"),
    ]
    device.modules["b"] = replace(device.modules["b"], status="exited", exit_code=1, finished_at=NOW)
    waiting = device.tick(gen1, NOW + timedelta(seconds=1))
    assert waiting.wake_at == NOW + timedelta(seconds=10)
    assert device.converge(gen1, waiting.wake_at) == [
        ("set_restart_book", "b"),
        ("restart", "b"),
        ("set_restart_book", "b"),  # seen healthy after the restart: its healthy run starts counting
    ]
    assert device.books["b"] == RestartBook(
        count=1, last_restart_at=waiting.wake_at, healthy_since=waiting.wake_at
    )

    ten_minutes_on = waiting.wake_at + timedelta(minutes=10)
    assert device.converge(gen1, ten_minutes_on) == [("set_restart_book", "b")]
    assert device.books["b"] == RestartBook(count=0, last_restart_at=waiting.wake_at)

    gen2 = desired({"a": mod(WEB2, startup_order=0), "b": b})
    later = ten_minutes_on + timedelta(minutes=1)
    assert device.converge(gen2, later) == [
        ("pull", "a"),
        ("stop", "a"),
        ("remove", "a"),
        ("create", "a"),
        ("start", "a"),
    ]
    gen3 = desired({"a": mod(WEB2, startup_order=0)})
    assert device.converge(gen3, later) == [("stop", "b"), ("remove", "b"), ("set_restart_book", "b")]
    assert set(device.modules) == {"a"} and device.books == {}


def test_pull_progress_is_in_the_status_of_the_module_that_waits_for_it() -> None:
    progress = PullProgress(image=WEB2, bytes_done=300, bytes_total=1200, bytes_per_s=100.0, eta_s=9.0)
    o = seen("web", web)
    img = ImageAvailability(present={WEB1}, pulling={WEB2}, progress={WEB2: progress})
    m = mod(WEB2)
    status = module_status(
        "web", m, o, img, RestartBook(), plan(desired({"web": m}), {"web": o}, img, {}, NOW)
    )
    assert status.runtime_status == "running" and status.pull == progress
    assert status.pull is not None and status.pull.percent == 25.0


def test_no_progress_once_the_image_is_here() -> None:
    img = ImageAvailability(present={WEB1}, progress={WEB1: PullProgress(image=WEB1)})
    status = module_status(
        "web", web, None, img, RestartBook(), plan(desired({"web": web}), {}, img, {}, NOW)
    )
    assert status.pull is None
