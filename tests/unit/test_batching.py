"""Adaptive batching: the pure ``plan`` and the ``Batcher`` around it.

``plan`` is tested on its own (no clock, no threads): the delay bound holds by construction.
The Batcher runs real onnxruntime sessions on models built with ``onnx.helper``; a fake ``run``
appears only where a test needs to hold a batch or make one fail on purpose.
"""

from __future__ import annotations

import asyncio
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from modules.contract import Batching
from modules.profiles import get_profile
from modules.scoring.backends import TensorSpec, load_backend
from modules.scoring.batching import (
    INLINE_RUN_S,
    LONE_STREAK,
    Batcher,
    Feeds,
    RowCost,
    batchable,
    feeds_key,
    one_row,
    plan,
    tensor_batches,
)
from modules.scoring.pool import PoolBusy, PoolClosed, PoolTimeout


@dataclass(frozen=True)
class W:
    """A waiting request as ``plan`` sees it."""

    rows: int
    key: str = "a"
    arrived: float = 0.0


# --- plan ---------------------------------------------------------------------------------


def test_a_lone_request_runs_at_once_without_a_delay() -> None:
    assert plan([W(1)], now=0.0, max_rows=32, max_delay_s=0.0).take == (0,)
    assert plan([], now=0.0, max_rows=32, max_delay_s=0.0).take == ()


def test_with_a_delay_a_batch_waits_until_its_oldest_request_is_due() -> None:
    waiting = [W(1, arrived=10.0), W(2, arrived=10.001)]
    early = plan(waiting, now=10.002, max_rows=32, max_delay_s=0.005)
    assert early.take == () and early.wake_at == pytest.approx(10.005)
    assert plan(waiting, now=10.005, max_rows=32, max_delay_s=0.005).take == (0, 1)


def test_a_full_batch_runs_before_its_delay() -> None:
    waiting = [W(3), W(5), W(8)]
    assert plan(waiting, now=0.0, max_rows=16, max_delay_s=1.0).take == (0, 1, 2)


def test_the_next_request_that_does_not_fit_makes_the_batch_full() -> None:
    waiting = [W(10), W(4), W(5), W(1)]
    assert plan(waiting, now=0.0, max_rows=16, max_delay_s=1.0).take == (0, 1)


def test_only_requests_with_the_head_s_key_join_it() -> None:
    waiting = [W(1, "x"), W(1, "y"), W(1, "x"), W(1, "y")]
    assert plan(waiting, now=0.0, max_rows=8, max_delay_s=0.0).take == (0, 2)


def test_a_request_larger_than_the_limit_runs_alone() -> None:
    assert plan([W(100), W(1)], now=0.0, max_rows=16, max_delay_s=1.0).take == (0,)


def test_plan_never_overfills_and_never_holds_a_due_request() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        max_rows = rng.randint(1, 64)
        delay = rng.choice([0.0, 0.001, 0.01])
        arrivals = sorted(rng.uniform(0, 0.02) for _ in range(rng.randint(1, 12)))
        waiting = [W(rng.randint(1, 20), rng.choice("ab"), t) for t in arrivals]
        now = rng.uniform(arrivals[-1], 0.04)
        decision = plan(waiting, now, max_rows, delay)
        head = waiting[0]
        if decision.take:
            assert decision.take[0] == 0, "the oldest request always leads its batch"
            rows = sum(waiting[i].rows for i in decision.take)
            assert rows <= max_rows or len(decision.take) == 1
            assert all(waiting[i].key == head.key for i in decision.take)
        else:
            assert now < head.arrived + delay, "a due request was held back"
            assert decision.wake_at == head.arrived + delay


# --- what can be batched ------------------------------------------------------------------


def test_batchable_needs_a_dynamic_first_dimension_everywhere() -> None:
    dynamic = TensorSpec("x", "FP32", (None, 4))
    assert batchable([dynamic], [TensorSpec("y", "FP32", (None,))]) is None
    fixed = batchable([TensorSpec("x", "FP32", (1, 4))], [TensorSpec("y", "FP32", (None,))])
    assert fixed == "input 'x' has shape [1, 4], without a dynamic batch dimension"
    scalar = batchable([dynamic], [TensorSpec("n", "INT64", ())])
    assert scalar is not None and "output 'n'" in scalar


def test_feeds_key_groups_by_everything_but_the_batch_dimension() -> None:
    a = feeds_key({"x": np.zeros((2, 3), np.float32)})
    b = feeds_key({"x": np.zeros((5, 3), np.float32)})
    assert a[0] == b[0] and (a[1], b[1]) == (2, 5)
    assert feeds_key({"x": np.zeros((2, 4), np.float32)})[0] != a[0]
    assert feeds_key({"x": np.zeros((2, 3), np.float64)})[0] != a[0]
    ragged = feeds_key({"x": np.zeros((2, 3), np.float32), "y": np.zeros((3, 3), np.float32)})
    assert ragged[0] != feeds_key({"x": np.zeros((2, 3), np.float32), "y": np.zeros((3, 3), np.float32)})[0]
    scalar = {"x": np.ones((), np.float32)}
    assert feeds_key(scalar)[0] != feeds_key(scalar)[0], "no batch dimension: a batch of its own"
    two = feeds_key({"y": np.zeros((2, 3), np.int64), "x": np.zeros((2, 3), np.float32)})
    other_order = feeds_key({"x": np.zeros((4, 3), np.float32), "y": np.zeros((4, 3), np.int64)})
    assert two[0] == other_order[0] and (two[1], other_order[1]) == (2, 4)


# --- the Batcher on real models -----------------------------------------------------------


def _write(path: Path, nodes: list, inputs: list, outputs: list, weights: list) -> Path:
    graph = helper.make_graph(nodes, "m", inputs, outputs, initializer=weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture(scope="module")
def linear(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """y = x @ W + 1 for x of shape [N, 4]: a model with a dynamic batch dimension."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    return _write(
        tmp_path_factory.mktemp("models") / "linear.onnx",
        [
            helper.make_node("MatMul", ["x", "w"], ["xw"]),
            helper.make_node("Add", ["xw", "one"], ["y"]),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.ones(3, np.float32), "one")],
    )


@pytest.fixture(scope="module")
def row_sums(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """y = sum of each row of x [N, M]: the second dimension is dynamic too."""
    return _write(
        tmp_path_factory.mktemp("models") / "sums.onnx",
        [helper.make_node("ReduceSum", ["x", "axes"], ["y"], keepdims=0)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "m"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
        [numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )


def _backend(path: Path):  # type: ignore[no-untyped-def]
    return load_backend(path, get_profile("cpu"), model_name=path.stem, threads=1)


class Gate:
    """A ``run`` wrapper that holds the first batch until released, counting rows per call."""

    def __init__(self, run) -> None:  # type: ignore[no-untyped-def]
        self.run = run
        self.entered = threading.Event()
        self.release = threading.Event()
        self.calls: list[int] = []

    def __call__(self, feeds: Feeds) -> Feeds:
        self.calls.append(next(iter(feeds.values())).shape[0])
        self.entered.set()
        self.release.wait(10)
        return self.run(feeds)


async def _held(batcher: Batcher, gate: Gate, first: Feeds) -> asyncio.Task[Feeds]:
    """Start ``first`` and wait until its batch is inside ``run``."""
    task = asyncio.ensure_future(batcher.infer(first))
    await asyncio.to_thread(gate.entered.wait, 10)
    return task


async def test_batched_results_equal_per_request_runs(linear: Path) -> None:
    backend = _backend(linear)
    gate = Gate(backend.infer)
    batcher = Batcher(tensor_batches(gate), Batching(max_batch_size=64), name="linear", key=feeds_key)
    rng = np.random.default_rng(0)
    requests = [rng.standard_normal((int(rng.integers(1, 6)), 4)).astype(np.float32) for _ in range(12)]
    first = await _held(batcher, gate, {"x": requests[0]})
    rest = [asyncio.ensure_future(batcher.infer({"x": r})) for r in requests[1:]]
    await asyncio.sleep(0.05)
    assert batcher.queued == 11
    gate.release.set()
    answers = [await first, *await asyncio.gather(*rest)]
    for request, answer in zip(requests, answers, strict=True):
        np.testing.assert_array_equal(answer["y"], backend.infer({"x": request})["y"])
    assert gate.calls == [len(requests[0]), sum(len(r) for r in requests[1:])], "the 11 waiting ran as one"
    assert batcher.sizes.count == 2 and batcher.split_batches == 0
    batcher.close()


async def test_requests_with_other_shapes_run_in_their_own_batches(row_sums: Path) -> None:
    backend = _backend(row_sums)
    gate = Gate(backend.infer)
    batcher = Batcher(tensor_batches(gate), Batching(max_batch_size=64), name="sums", key=feeds_key)
    first = await _held(batcher, gate, {"x": np.ones((1, 2), np.float32)})
    shapes = [(2, 3), (1, 5), (3, 3), (2, 5), (1, 3)]
    tasks = [asyncio.ensure_future(batcher.infer({"x": np.ones(s, np.float32)})) for s in shapes]
    await asyncio.sleep(0.05)
    gate.release.set()
    await first
    for shape, answer in zip(shapes, await asyncio.gather(*tasks), strict=True):
        assert answer["y"].tolist() == [float(shape[1])] * shape[0]
    assert gate.calls == [1, 2 + 3 + 1, 1 + 2], "width 3 together, then width 5 together"
    batcher.close()


async def test_a_failing_request_fails_alone(linear: Path) -> None:
    backend = _backend(linear)

    def run(feeds: Feeds) -> Feeds:
        if (feeds["x"] < 0).any():
            raise ValueError("negative input")
        return backend.infer(feeds)

    gate = Gate(run)
    batcher = Batcher(tensor_batches(gate), Batching(max_batch_size=64), name="linear", key=feeds_key)
    first = await _held(batcher, gate, {"x": np.ones((1, 4), np.float32)})
    good = [asyncio.ensure_future(batcher.infer({"x": np.full((2, 4), i, np.float32)})) for i in range(3)]
    bad = asyncio.ensure_future(batcher.infer({"x": -np.ones((1, 4), np.float32)}))
    await asyncio.sleep(0.05)
    gate.release.set()
    await first
    for i, task in enumerate(good):
        np.testing.assert_array_equal(
            (await task)["y"], backend.infer({"x": np.full((2, 4), i, np.float32)})["y"]
        )
    with pytest.raises(ValueError, match="negative input"):
        await bad
    assert batcher.split_batches == 1
    assert gate.calls == [1, 7, 2, 2, 2, 1], "the failed batch of 7 rows ran again request by request"
    batcher.close()


async def test_a_full_queue_is_busy_and_a_slow_batch_times_out(linear: Path) -> None:
    backend = _backend(linear)
    gate = Gate(backend.infer)
    batcher = Batcher(
        tensor_batches(gate), Batching(), name="linear", key=feeds_key, max_queued=2, timeout_s=0.2
    )
    first = await _held(batcher, gate, {"x": np.ones((1, 4), np.float32)})
    waiting = [asyncio.ensure_future(batcher.infer({"x": np.ones((1, 4), np.float32)})) for _ in range(2)]
    await asyncio.sleep(0)
    with pytest.raises(PoolBusy):
        await batcher.infer({"x": np.ones((1, 4), np.float32)})
    for task in (first, *waiting):
        with pytest.raises(PoolTimeout):
            await task
    assert batcher.queued == 0, "timed-out requests leave the queue"
    gate.release.set()
    await asyncio.sleep(0.05)
    answer = await batcher.infer({"x": np.ones((1, 4), np.float32)})
    assert answer["y"].shape == (1, 3), "the batcher goes on after timeouts"
    batcher.close()


async def test_close_answers_the_waiting(linear: Path) -> None:
    gate = Gate(_backend(linear).infer)
    batcher = Batcher(tensor_batches(gate), Batching(), name="linear", key=feeds_key)
    first = await _held(batcher, gate, {"x": np.ones((1, 4), np.float32)})
    waiting = asyncio.ensure_future(batcher.infer({"x": np.ones((1, 4), np.float32)}))
    await asyncio.sleep(0)
    batcher.close()
    with pytest.raises(PoolClosed):
        await waiting
    with pytest.raises(PoolClosed):
        await batcher.infer({"x": np.ones((1, 4), np.float32)})
    gate.release.set()
    assert (await first)["y"].shape == (1, 3), "the batch already running still answers"


async def test_a_delay_lets_a_batch_fill_up(linear: Path) -> None:
    backend = _backend(linear)
    calls: list[int] = []

    def run(feeds: Feeds) -> Feeds:
        calls.append(feeds["x"].shape[0])
        return backend.infer(feeds)

    batcher = Batcher(
        tensor_batches(run), Batching(max_batch_size=4, max_batch_delay_ms=1000), name="linear", key=feeds_key
    )
    tasks = [asyncio.ensure_future(batcher.infer({"x": np.ones((1, 4), np.float32)})) for _ in range(4)]
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert calls == [4], "four rows filled the batch: it ran without waiting out the delay"
    batcher.close()


def test_thread_discipline_runs_never_add_up_to_more_threads_than_cpus(linear: Path) -> None:
    profile = get_profile("cpu")
    batched = load_backend(linear, profile, model_name="m", threads=4, concurrent=1)
    shared = load_backend(linear, profile, model_name="m", threads=4, concurrent=4)
    uneven = load_backend(linear, profile, model_name="m", threads=2, concurrent=3)
    assert (batched.threads, shared.threads, uneven.threads) == (4, 1, 1)  # type: ignore[attr-defined]


async def test_cheap_batches_run_on_the_loop_once_measured(linear: Path) -> None:
    backend = _backend(linear)
    threads: list[str] = []

    def run(feeds: Feeds) -> Feeds:
        threads.append(threading.current_thread().name)
        return backend.infer(feeds)

    batcher = Batcher(tensor_batches(run), Batching(), name="linear", key=feeds_key)
    for _ in range(RowCost.WARM_UP):
        await batcher.infer({"x": np.ones((1, 4), np.float32)})
    assert threads == ["batch_linear"] * RowCost.WARM_UP, "measured in the thread first"
    assert batcher.costs.batches == RowCost.WARM_UP
    batcher.costs.per_row_s = INLINE_RUN_S / 10  # as measured on any machine fast enough
    for _ in range(4):
        await batcher.infer({"x": np.ones((1, 4), np.float32)})
    assert threads[RowCost.WARM_UP :] == [threading.current_thread().name] * 4, "then run on the loop"
    assert batcher.inline_batches == 4
    batcher.close()


async def test_slow_batches_and_entry_scripts_never_run_on_the_loop() -> None:
    loop_thread = threading.current_thread().name
    seen: list[str] = []

    def slow(items: list[str]) -> list[str]:
        seen.append(threading.current_thread().name)
        threading.Event().wait(2 * INLINE_RUN_S)
        return [i.upper() for i in items]

    def fast(items: list[str]) -> list[str]:
        seen.append(threading.current_thread().name)
        return [i.upper() for i in items]

    for run, inline in ((slow, True), (fast, False)):
        seen.clear()
        batcher = Batcher(run, Batching(), name="s", key=one_row, inline_s=INLINE_RUN_S if inline else 0)
        answers = [await batcher.infer(f"r{i}") for i in range(RowCost.WARM_UP + 4)]
        assert answers == [f"R{i}" for i in range(RowCost.WARM_UP + 4)]
        assert loop_thread not in seen and batcher.inline_batches == 0
        batcher.close()


def test_row_cost_is_unknown_until_warmed_up_then_a_moving_average() -> None:
    cost = RowCost()
    assert cost.expected(1) == float("inf")
    for _ in range(RowCost.WARM_UP):
        cost.observe(4, 0.004)
    assert cost.expected(2) == pytest.approx(0.002)
    cost.observe(1, 0.011)
    assert 0.001 < cost.per_row_s < 0.0011 + 0.001, "one slow batch moves the average, not replaces it"


async def test_a_batch_runner_that_loses_results_fails_each_request_on_its_own() -> None:
    def lossy(items: list[str]) -> list[str]:
        return items[:1]  # one result, whatever the batch

    gate = threading.Event()

    def held(items: list[str]) -> list[str]:
        gate.wait(10)
        return lossy(items)

    batcher = Batcher(held, Batching(), name="lossy", key=one_row)
    first = asyncio.ensure_future(batcher.infer("a"))
    await asyncio.sleep(0.05)
    rest = [asyncio.ensure_future(batcher.infer(x)) for x in ("b", "c")]
    await asyncio.sleep(0.01)
    gate.set()
    assert await first == "a"
    assert await asyncio.gather(*rest) == ["b", "c"], "run alone, each gets its own result"
    assert batcher.split_batches == 1
    batcher.close()


async def test_requests_that_arrive_together_share_a_batch_on_the_loop_too(linear: Path) -> None:
    backend = _backend(linear)
    calls: list[int] = []

    def run(feeds: Feeds) -> Feeds:
        calls.append(feeds["x"].shape[0])
        return backend.infer(feeds)

    batcher = Batcher(tensor_batches(run), Batching(), name="linear", key=feeds_key, inline_s=1.0)
    for _ in range(RowCost.WARM_UP):
        batcher.costs.observe(1, 1e-6)  # measured as cheap: batches run on the loop
    await asyncio.gather(*(batcher.infer({"x": np.ones((1, 4), np.float32)}) for _ in range(8)))
    assert calls == [1, 7] and batcher.inline_batches == 2, "the first at once (no load yet), then one batch"
    await asyncio.gather(*(batcher.infer({"x": np.ones((1, 4), np.float32)}) for _ in range(8)))
    assert calls[2:] == [8] and batcher.inline_batches == 3, "under load all of them"
    batcher.close()


async def test_a_request_waiting_for_its_batch_delay_still_times_out(linear: Path) -> None:
    """Timeouts are armed lazily, once a request waits past the pass it arrived in: also while
    its batch waits for company (here longer than the timeout)."""
    backend = _backend(linear)
    batcher = Batcher(
        tensor_batches(backend.infer),
        Batching(max_batch_delay_ms=1000),
        name="linear",
        key=feeds_key,
        timeout_s=0.05,
    )
    with pytest.raises(PoolTimeout):
        await batcher.infer({"x": np.ones((1, 4), np.float32)})
    assert batcher.queued == 0
    batcher.close()


async def test_a_lone_request_runs_at_once_and_load_turns_batching_back_on(linear: Path) -> None:
    """While requests come one at a time, the first of a loop pass runs in its caller's task;
    those after it in the same pass still form a batch, and after a batch of several, requests
    wait for the pass's batch again."""
    backend = _backend(linear)
    calls: list[tuple[int, bool]] = []

    def run(feeds: Feeds) -> Feeds:
        in_caller = threading.current_thread() is threading.main_thread() and (
            asyncio.current_task() is not None
        )
        calls.append((feeds["x"].shape[0], in_caller))
        return backend.infer(feeds)

    # Any batch is cheap enough for the loop once measured (the bound is not what this tests).
    batcher = Batcher(tensor_batches(run), Batching(), name="linear", key=feeds_key, inline_s=1.0)
    row = {"x": np.ones((1, 4), np.float32)}
    for _ in range(RowCost.WARM_UP):
        await batcher.infer(row)
    calls.clear()

    await batcher.infer(row)
    assert calls == [(1, True)], "a lone request does not wait for the next loop pass"
    answers = await asyncio.gather(*(batcher.infer({"x": np.full((1, 4), i, np.float32)}) for i in range(5)))
    assert calls[1:] == [(1, True), (4, False)], "the first runs at once, the others as one batch"
    for i, answer in enumerate(answers):
        np.testing.assert_array_equal(answer["y"], backend.infer({"x": np.full((1, 4), i, np.float32)})["y"])
    calls.clear()
    await asyncio.gather(*(batcher.infer(row) for _ in range(5)))
    assert calls == [(5, False)], "after a batch of several, requests gather again"
    await batcher.infer(row)
    await batcher.infer(row)
    assert calls[1:] == [(1, False), (1, True)], "one request per pass: lone again"
    batcher.close()


async def test_requests_that_keep_coming_alone_get_the_lone_runner(linear: Path) -> None:
    """The ``run_lone`` runner (a worker's session with every CPU's threads) takes a request that
    runs alone only after ``LONE_STREAK`` batches of one in a row; a batch of several breaks the
    streak, and batches of several never use it."""
    backend = _backend(linear)
    used: list[str] = []

    def run(feeds: Feeds) -> Feeds:
        used.append(f"batch of {feeds['x'].shape[0]}")
        return backend.infer(feeds)

    def run_lone(feeds: Feeds) -> Feeds:
        used.append("lone")
        return backend.infer(feeds)

    batcher = Batcher(
        tensor_batches(run), Batching(), name="linear", key=feeds_key, inline_s=1.0, run_lone=run_lone
    )
    row = {"x": np.ones((1, 4), np.float32)}
    for _ in range(RowCost.WARM_UP):
        await batcher.infer(row)
    used.clear()
    answers = [await batcher.infer(row) for _ in range(3)]
    assert used == ["lone"] * 3, "requests one at a time, after a long streak of them"
    for answer in answers:
        np.testing.assert_array_equal(answer["y"], backend.infer(row)["y"])
    used.clear()
    await asyncio.gather(*(batcher.infer(row) for _ in range(5)))
    assert used[0] == "lone" and used[1:] == ["batch of 4"], "the first of a pass, then a batch"
    used.clear()
    for _ in range(LONE_STREAK + 2):
        await batcher.infer(row)
    assert used == ["batch of 1"] * LONE_STREAK + ["lone"] * 2, "a new streak first"
    batcher.close()


async def test_requests_are_answered_when_the_batch_thread_cannot_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Starting the batch thread fails (``can't start new thread``): the batch that needed it is
    answered at once with that error, and so is the request waiting behind it (another batch key,
    tried next), instead of waiting for their timeouts or forever."""

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    batcher = Batcher(
        lambda items: items, Batching(), name="s", key=lambda item: (item, 1), inline_s=0, timeout_s=30
    )
    try:
        first = asyncio.ensure_future(batcher.infer("a"))
        behind = asyncio.ensure_future(batcher.infer("b"))  # another key: not in the first batch
        for task in (first, behind):
            with pytest.raises(RuntimeError, match="model s: cannot start the batch thread: can't start new"):
                await asyncio.wait_for(task, 5)
        assert batcher.queued == 0
    finally:
        batcher.close()


async def test_the_batcher_recovers_once_its_thread_can_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed thread start does not leave the batcher busy for good: once threads can start
    again, the next request runs (on a thread of its own) and gets its result."""
    real_start = threading.Thread.start
    failing = [True]

    def start(self: threading.Thread) -> None:
        if failing[0]:
            raise RuntimeError("can't start new thread")
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    batcher = Batcher(
        lambda items: [f"ran {i}" for i in items],
        Batching(),
        name="s",
        key=lambda item: (item, 1),
        inline_s=0,
        timeout_s=30,
    )
    try:
        with pytest.raises(RuntimeError, match="cannot start the batch thread"):
            await asyncio.wait_for(batcher.infer("a"), 5)
        failing[0] = False
        assert await asyncio.wait_for(batcher.infer("b"), 5) == "ran b"
        assert await asyncio.wait_for(batcher.infer("c"), 5) == "ran c"
    finally:
        batcher.close()


@pytest.mark.parametrize(("worker", "lone_threads"), [("1/2/3/1/{tmp}", 4), (None, None)])
def test_a_worker_opens_a_lone_session_with_every_cpu(
    linear: Path, tmp_path: Path, worker: str | None, lone_threads: int | None
) -> None:
    """A worker (here 1 of 2 with SCORING_THREADS=4) batches on its share of the threads (2) and
    opens the model again with all 4 for requests that come alone; one process needs no second."""
    from modules.scoring.config import WORKER_ENV, load_config
    from modules.scoring.onnx_service import OnnxService

    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(linear.read_bytes())
    env = {"MODEL_DIR": str(folder), "SCORING_THREADS": "4"}
    if worker is not None:
        env[WORKER_ENV] = worker.format(tmp=tmp_path)
    service = OnnxService(load_config(env, []))
    service.load()
    try:
        [(name, backend)] = service.backends.items()
        assert backend.threads == (2 if worker else 4)
        lone = service.lone_backends.get(name)
        assert (lone.threads if lone is not None else None) == lone_threads
        assert name in service.batchers
    finally:
        service.close()
