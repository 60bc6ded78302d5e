"""Several worker processes on one port: how many, their share of the CPUs, readiness marks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from modules.scoring.config import WORKER_ENV, ConfigError, WorkerSlot, load_config
from modules.scoring.siblings import Siblings
from modules.scoring.workers import Heartbeats, worker_count


def _nocode(tmp_path: Path, **env: str) -> dict[str, str]:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    return {"MODEL_DIR": str(model), "MODULE_JSON": str(tmp_path / "none.json"), **env}


def _script(tmp_path: Path, **env: str) -> dict[str, str]:
    script = tmp_path / "score.py"
    script.write_text("def init(): pass\ndef run(data): return data\n")
    return {"ENTRY_SCRIPT": str(script), "MODULE_JSON": str(tmp_path / "none.json"), **env}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SCORING_THREADS": "4"}, 4),  # auto: one per CPU for a no-code module on the cpu profile
        ({"SCORING_THREADS": "1"}, 1),
        ({"SCORING_THREADS": "4", "SCORING_WORKERS": "auto"}, 4),
        ({"SCORING_THREADS": "4", "PROFILE": "cuda"}, 1),  # one accelerator: one set of sessions
        ({"SCORING_THREADS": "4", "PROFILE": "openvino-myriad"}, 1),
        ({"SCORING_THREADS": "4", "PROFILE": "openvino-cpu"}, 4),
        ({"SCORING_THREADS": "4", "PROFILE": "no-such-profile"}, 1),  # the worker reports the error
        ({"SCORING_THREADS": "4", "SCORING_WORKERS": "3"}, 3),
        ({"SCORING_THREADS": "1", "SCORING_WORKERS": "2"}, 2),
    ],
)
def test_worker_count_for_no_code_modules(tmp_path: Path, env: dict[str, str], expected: int) -> None:
    assert worker_count(load_config(_nocode(tmp_path, **env), [])) == expected


def test_entry_scripts_run_in_one_process_unless_asked(tmp_path: Path) -> None:
    assert worker_count(load_config(_script(tmp_path, SCORING_THREADS="4"), [])) == 1
    assert worker_count(load_config(_script(tmp_path, SCORING_THREADS="4"), ["--workers", "2"])) == 2


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_bad_worker_setting_is_rejected(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="SCORING_WORKERS must be 'auto' or a positive integer"):
        load_config(_nocode(tmp_path, SCORING_WORKERS=value), [])


@pytest.mark.parametrize(
    ("threads", "count", "share"), [(4, 2, 2), (2, 2, 1), (3, 2, 1), (1, 2, 1), (8, 3, 2)]
)
def test_a_worker_gets_its_share_of_the_cpus(tmp_path: Path, threads: int, count: int, share: int) -> None:
    slot = WorkerSlot(2, count, 7, 42, tmp_path)
    env = _nocode(tmp_path, SCORING_THREADS=str(threads), **{WORKER_ENV: slot.env_value()})
    config = load_config(env, [])
    assert config.worker == slot
    assert config.threads == share


def test_a_worker_shares_the_cpus_the_cgroup_quota_allows(tmp_path: Path) -> None:
    """Without SCORING_THREADS, the CPUs come from affinity and quota (cpus.py), then are shared."""
    from modules.scoring.cpus import allowed_cpus

    slot = WorkerSlot(1, 2, 7, 42, tmp_path)
    config = load_config(_nocode(tmp_path, **{WORKER_ENV: slot.env_value()}), [])
    assert config.threads == max(1, allowed_cpus(environ={}) // 2)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "1/2",
        "3/2/7/42//tmp/x",
        "1/2/x/42//tmp",
        "1/2/7/42/relative",
        "0/2/7/42//tmp",
        "1/2/7//tmp/x",  # no supervisor pid
        "1/2/7/0//tmp/x",
    ],
)
def test_malformed_worker_slot_is_rejected(value: str) -> None:
    with pytest.raises(ConfigError, match=WORKER_ENV):
        WorkerSlot.parse(value)


def test_a_worker_slot_round_trips_with_the_supervisor_pid(tmp_path: Path) -> None:
    slot = WorkerSlot(2, 3, 7, 1, tmp_path)
    assert WorkerSlot.parse(slot.env_value()) == slot
    assert WorkerSlot.parse(slot.env_value()).parent_pid == 1


_DIE_WITH_PARENT = (
    "import sys; from modules.scoring.workers import die_with_parent; die_with_parent(int(sys.argv[1]))"
)


@pytest.mark.parametrize("parent", ["self", "pid-1"])
def test_a_worker_lives_while_its_parent_is_the_supervisor_it_was_given(parent: str) -> None:
    """The supervisor (this test process here) may be pid 1 itself, in a container without an
    init: a worker compares its parent with the supervisor's pid, not with 1. Given pid 1 while
    its parent is another process, it is an orphan and kills itself."""
    repo = Path(__file__).resolve().parents[2]
    given = os.getpid() if parent == "self" else 1
    done = subprocess.run(
        [sys.executable, "-c", _DIE_WITH_PARENT, str(given)], cwd=repo, capture_output=True, timeout=60
    )
    if parent == "self":
        assert done.returncode == 0, done.stderr.decode()
    else:
        assert done.returncode == -signal.SIGKILL


def test_heartbeat_silence_is_judged_on_the_monotonic_clock_not_the_wall_clock() -> None:
    beats = Heartbeats()
    assert beats.silent_for(1, None, now=100.0) == 0.0, "before the first beat"
    # The wall clock jumps by a year (NTP after boot): the mtimes jump, the monotonic clock does not.
    assert beats.silent_for(1, 1_000.0, now=100.0) == 0.0
    assert beats.silent_for(1, 1_000.0 + 365 * 86400, now=101.0) == 0.0, "a new mtime is a beat"
    assert beats.silent_for(1, 1_000.0 + 365 * 86400 + 1, now=102.0) == 0.0
    # And backwards: still a beat, whatever the wall clock says.
    assert beats.silent_for(1, 500.0, now=103.0) == 0.0
    assert beats.silent_for(1, 500.0, now=110.5) == pytest.approx(7.5), "unchanged for 7.5 s"
    assert beats.silent_for(2, 500.0, now=110.5) == 0.0, "each worker on its own"
    assert beats.silent_for(1, 500.0, now=130.0) == pytest.approx(27.0)
    assert beats.silent_for(1, 501.0, now=131.0) == 0.0, "it beat again"


def test_readiness_waits_for_every_worker(tmp_path: Path) -> None:
    first = Siblings(WorkerSlot(1, 3, 7, 42, tmp_path), str)
    second = Siblings(WorkerSlot(2, 3, 7, 42, tmp_path), str)
    third = Siblings(WorkerSlot(3, 3, 7, 42, tmp_path), str)
    assert first.not_ready() == "worker 2/3: still initialising (loading the model / running init())"
    second.mark(True)
    assert first.not_ready() == "worker 3/3: still initialising (loading the model / running init())"
    third.mark(False, "BackendError: no model")
    assert first.not_ready() == "worker 3/3: initialisation failed: BackendError: no model"
    third.mark(True)
    assert first.not_ready() is None
    assert third.not_ready() == "worker 1/3: still initialising (loading the model / running init())"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "worker-2.ready",
        "worker-3.failed",
        "worker-3.ready",
    ]
