"""Durable agent state: transitions, atomic saves, recovery from corrupt files, and SIGKILL safety."""

from __future__ import annotations

import logging
import multiprocessing
import random
import signal
import time
from contextlib import suppress
from datetime import datetime, timedelta, timezone
from multiprocessing.connection import Connection
from pathlib import Path

import pytest

from agent.restart import RestartBook
from agent.state import AgentState, StateStore
from modules.contract import DesiredState

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)


def desired(generation: int) -> DesiredState:
    return DesiredState(
        device_id="dev1",
        generation=generation,
        issued_at=NOW,
        expires_at=NOW + timedelta(days=1),
        modules={"web": {"image": f"localhost:5000/web:{generation}", "env": {"GEN": str(generation)}}},
        signature="c2lnbmF0dXJl",
    )


def test_empty_state() -> None:
    state = AgentState()
    assert (state.active, state.last_generation, state.status, state.restart_books) == (None, 0, None, {})


def test_transitions() -> None:
    applied = AgentState().applied(desired(1), NOW)
    assert (applied.active, applied.last_generation, applied.status) == (desired(1), 1, "applying")
    good = applied.became_healthy()
    assert (good.last_known_good, good.status) == (desired(1), "healthy")
    second = good.applied(desired(2), NOW + timedelta(hours=1))
    assert (second.active, second.applied_at, second.last_known_good) == (
        desired(2),
        NOW + timedelta(hours=1),
        desired(1),
    )
    back = second.rolled_back("web exited with code 1")
    assert (back.active, back.last_generation, back.status, back.reason) == (
        desired(1),
        2,
        "rolled_back",
        "web exited with code 1",
    )
    stuck = second.failed("web exited with code 1")
    assert (stuck.active, stuck.status) == (desired(2), "failed")


def test_cannot_roll_back_without_a_known_good_state() -> None:
    with pytest.raises(ValueError, match="no last known good"):
        AgentState().applied(desired(1), NOW).rolled_back("broken")


def test_restart_books() -> None:
    book = RestartBook(count=3, last_restart_at=NOW)
    state = AgentState().with_book("web", book).with_book("api", RestartBook(count=1))
    assert state.with_book("api", None).restart_books == {"web": book}


def test_missing_file_is_an_empty_state(tmp_path: Path) -> None:
    assert StateStore(tmp_path / "none" / "state.json").load() == AgentState()


def test_round_trip_keeps_everything(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "agent" / "state.json")
    state = (
        AgentState()
        .applied(desired(1), NOW)
        .became_healthy()
        .applied(desired(2), NOW)
        .with_book("web", RestartBook(count=4, last_restart_at=NOW, healthy_since=NOW, stopped=True))
    )
    store.save(state)
    assert StateStore(store.path).load() == state
    assert (store.path.stat().st_mode & 0o777) == 0o600


def test_previous_version_is_kept(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    first, second = AgentState().applied(desired(1), NOW), AgentState().applied(desired(2), NOW)
    store.save(first)
    assert not store.prev.exists()
    store.save(second)
    assert AgentState.model_validate_json(store.prev.read_bytes()) == first
    assert store.load() == second


def test_corrupt_file_falls_back_to_the_backup(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = StateStore(tmp_path / "state.json")
    store.save(AgentState().applied(desired(1), NOW))
    store.save(AgentState().applied(desired(2), NOW))
    store.path.write_bytes(b'{"format": 1, "last_applied": {"device_id": "dev1", "gener')
    with caplog.at_level(logging.ERROR, logger="agent.state"):
        state = store.load()
    assert state.last_generation == 1
    corrupt = tmp_path / "state.json.corrupt"
    assert corrupt.read_bytes().startswith(b'{"format": 1')
    assert not store.path.exists()
    assert "is corrupt, moved to" in caplog.text
    assert "restored from the backup" in caplog.text
    store.save(state.applied(desired(3), NOW))
    assert store.load().last_generation == 3


def test_both_files_corrupt_start_empty(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = StateStore(tmp_path / "state.json")
    store.path.write_bytes(b"")
    store.prev.write_bytes(b"\x00\x00")
    with caplog.at_level(logging.ERROR, logger="agent.state"):
        assert store.load() == AgentState()
    assert "starting from an empty state" in caplog.text
    assert {p.name for p in tmp_path.iterdir()} == {"state.json.corrupt", "state.json.prev.corrupt"}


def test_invalid_content_names_the_field(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = StateStore(tmp_path / "state.json")
    store.path.write_text('{"restart_books": {"web": {"count": "many"}}}')
    with caplog.at_level(logging.ERROR, logger="agent.state"):
        assert store.load() == AgentState()
    assert "restart_books.web.count" in caplog.text


def test_leftovers_of_interrupted_saves_are_removed(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.json")
    store.save(AgentState().applied(desired(1), NOW))
    leftovers = [tmp_path / ".state.json.abc123.tmp", tmp_path / ".state.json.prev.tmp"]
    for p in leftovers:
        p.write_bytes(b"half")
    other = tmp_path / "unrelated.tmp"
    other.write_bytes(b"not ours")
    assert store.load().last_generation == 1
    assert not any(p.exists() for p in leftovers)
    assert other.exists()


def _writer(path: Path, conn: Connection) -> None:
    """Save a growing state in a loop, reporting each save that returned, until killed."""
    store = StateStore(path)
    state = store.load()
    n = state.last_generation
    conn.send(("ready", n))
    while True:
        n += 1
        modules = {
            f"m{i}": {"image": f"localhost:5000/m{i}:{n}", "env": {"N": str(n) * 20}} for i in range(40)
        }
        d = DesiredState(
            device_id="dev1", generation=n, issued_at=NOW, expires_at=NOW + timedelta(days=1), modules=modules
        )
        state = state.applied(d, NOW).with_book("m0", RestartBook(count=n))
        store.save(state)
        conn.send(("saved", n))


def test_sigkill_at_random_moments_always_leaves_a_readable_state(tmp_path: Path) -> None:
    """A writer process saving in a loop is SIGKILLed 20 times; every save that returned survives."""
    path = tmp_path / "state.json"
    rng = random.Random(20260301)
    ctx = multiprocessing.get_context("fork")
    confirmed = 0
    for _ in range(20):
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_writer, args=(path, writer), daemon=True)
        proc.start()
        writer.close()
        tag, start = reader.recv()
        assert tag == "ready"
        assert start >= confirmed
        time.sleep(rng.uniform(0.0, 0.08))
        proc.kill()  # SIGKILL
        proc.join()
        assert proc.exitcode == -signal.SIGKILL
        saved = []
        with suppress(EOFError):
            while True:
                saved.append(reader.recv()[1])
        reader.close()
        confirmed = max([confirmed, *saved])
        state = StateStore(path).load()
        # Every save that returned survives. (More may have completed: the kill can land after a
        # save and before its "saved" message is whole in the pipe, so no upper bound holds.)
        assert state.last_generation >= confirmed
        confirmed = state.last_generation
        if state.last_generation:  # 0 when killed before the very first save completed
            assert state.restart_books["m0"].count == state.last_generation
        assert not list(tmp_path.glob("*.corrupt"))
    # How many saves complete between kills depends on the disk and the machine's load; what
    # matters is that kills landed among completed saves at all.
    assert confirmed > 0, "the writer never completed a save"
