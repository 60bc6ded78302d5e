"""The health prober against real scoring processes (run by ProcessRuntime) and a silent server."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest

from agent.actions import Create, Remove, Start
from agent.health import HealthProber, HealthResult, ProbeTarget
from agent.observed import config_hash
from agent.runtime.process import ProcessRuntime, image_dir
from modules.contract import DesiredModule, HealthCheck, PortMapping, utcnow
from tests.integration import module_image
from tests.integration.module_image import DigitsBuild, until, write_module_dir
from tests.services import free_port

pytestmark = pytest.mark.integration
digits_build = module_image.digits_build

IMAGE = "localhost:5000/edge/digits:1"
GATED_INIT = """\
import os, time


def init():
    while not os.path.exists(os.environ["GO_FILE"]):
        time.sleep(0.05)


def run(data):
    return {"echo": data}
"""


class Clock:
    """A monotonic clock the test moves by hand, so probe intervals are deterministic."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def runtime(tmp_path: Path, digits_build: DigitsBuild) -> AsyncIterator[ProcessRuntime]:
    images = tmp_path / "images"
    folder = write_module_dir(image_dir(images, IMAGE), digits_build)
    (folder / "src" / "gated_score.py").write_text(GATED_INIT)
    rt = ProcessRuntime(tmp_path / "state", images)
    yield rt
    for name in (await rt.observe())[0]:
        await rt.remove(Remove(module=name, reason="cleanup"))
    await rt.close()


async def start(rt: ProcessRuntime, name: str, **extra: object) -> ProbeTarget:
    desired = DesiredModule.model_validate(
        {"image": IMAGE, "ports": [PortMapping(container=5001, host=free_port())], **extra}
    )
    await rt.create(Create(module=name, spec=desired, config_hash=config_hash(desired), reason="test"))
    await rt.start(Start(module=name, reason="test"))
    seen = (await rt.observe())[0][name]
    url = rt.health_url(name, desired.health)
    assert url is not None
    return ProbeTarget(module=name, base_url=url, check=desired.health, started_at=seen.started_at)


async def probed(prober: HealthProber, clock: Clock, target: ProbeTarget) -> HealthResult:
    clock.now += target.check.interval_s
    return (await prober.check([target]))[target.module]


async def test_ready_module_is_live_ready_with_latency_and_provider(runtime: ProcessRuntime) -> None:
    target = await start(runtime, "digits")
    clock = Clock()
    async with HealthProber(clock=clock) as prober:
        result = await until(
            lambda: _ready(prober, clock, target), "the digits module to be ready", module_image.START_LIMIT_S
        )
        assert result.health.live and result.health.ready and result.health.error is None
        assert result.health.latency_ms is not None and result.health.latency_ms > 0
        assert result.health.checked_at is not None
        assert result.failures == 0
        assert result.execution_provider == "CPUExecutionProvider"


async def _ready(prober: HealthProber, clock: Clock, target: ProbeTarget) -> HealthResult | None:
    result = await probed(prober, clock, target)
    return result if result.health.ready else None


async def test_loading_module_is_live_not_ready_and_no_failure(
    runtime: ProcessRuntime, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    script = image_dir(tmp_path / "images", IMAGE) / "src" / "gated_score.py"
    target = await start(runtime, "gated", env={"ENTRY_SCRIPT": str(script), "GO_FILE": str(go)})
    clock = Clock()
    async with HealthProber(clock=clock) as prober:

        async def live() -> HealthResult | None:
            result = await probed(prober, clock, target)
            return result if result.health.live else None

        loading = await until(live, "the gated module to answer liveness")
        assert not loading.health.ready and loading.failures == 0
        assert loading.health.error is not None and "readiness GET" in loading.health.error
        assert "HTTP 503" in loading.health.error
        assert loading.execution_provider is None
        go.touch()
        ready = await until(lambda: _ready(prober, clock, target), "the gated module to be ready")
        assert ready.health.error is None
        assert ready.execution_provider is None  # an entry script does not say which provider it uses


async def test_killed_module_counts_consecutive_failures(runtime: ProcessRuntime) -> None:
    """Live once since its start, so failures count at once (inside the default 120 s start period)."""
    target = await start(runtime, "digits")
    clock = Clock()
    async with HealthProber(clock=clock) as prober:
        await until(lambda: _ready(prober, clock, target), "the digits module to be ready")
        pid = runtime.records()["digits"].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await until(lambda: _exited(runtime), "the module to be gone")
        failures = [await probed(prober, clock, target) for _ in range(3)]
    assert [r.failures for r in failures] == [1, 2, 3]
    last = failures[-1].health
    assert not last.live and not last.ready and last.latency_ms is None
    assert last.error is not None and last.error.startswith(f"liveness GET {target.base_url}/:")
    assert failures[-1].execution_provider == "CPUExecutionProvider"  # known for this start


async def _exited(rt: ProcessRuntime) -> bool:
    return (await rt.observe())[0]["digits"].status == "exited"


async def test_probes_wait_for_the_interval_and_a_new_start_resets(runtime: ProcessRuntime) -> None:
    target = await start(runtime, "digits")
    clock = Clock()
    async with HealthProber(clock=clock) as prober:
        first = await until(lambda: _ready(prober, clock, target), "the digits module to be ready")
        clock.now += target.check.interval_s / 2
        assert (await prober.check([target]))["digits"] is first  # not due: the last result again
        dead = ProbeTarget(
            module="digits",
            base_url=f"http://127.0.0.1:{free_port()}",
            check=target.check,
            started_at=target.started_at,
        )
        assert (await probed(prober, clock, dead)).failures == 1
        restarted = ProbeTarget(module="digits", base_url=dead.base_url, check=target.check, started_at=None)
        fresh = (await prober.check([restarted]))["digits"]  # a new start is probed at once
        assert fresh.starting and fresh.failures == 0  # in its start period: not counted
        assert fresh.execution_provider is None
        assert await prober.check([]) == {}


async def test_start_interval_until_first_ready_then_the_interval(runtime: ProcessRuntime) -> None:
    target = await start(runtime, "digits", health={"interval_s": 5.0, "start_interval_s": 1.0})
    clock = Clock()
    async with HealthProber(clock=clock) as prober:
        result = (await prober.check([target]))["digits"]
        loading = 0
        while not result.health.ready:  # loading the model: probed every start_interval_s
            clock.now += 1.0
            again = (await prober.check([target]))["digits"]
            assert again is not result, "not ready yet: due again after start_interval_s"
            result, loading = again, loading + 1
            assert loading < 600, "the digits module never became ready"
            await asyncio.sleep(0.05)
        clock.now += 1.0
        assert (await prober.check([target]))["digits"] is result  # ready once: interval_s now
        clock.now += 4.0
        assert (await prober.check([target]))["digits"] is not result


def silent(started_at: datetime | None, interval_s: float = 1.0) -> ProbeTarget:
    """A module that started at ``started_at`` and does not listen (yet): nothing on its port."""
    return ProbeTarget(
        module="slow",
        base_url=f"http://127.0.0.1:{free_port()}",
        check=HealthCheck(interval_s=interval_s, failure_threshold=2),
        started_at=started_at,
    )


async def test_failures_in_the_start_period_are_not_counted() -> None:
    clock = Clock()
    target = silent(utcnow())
    async with HealthProber(start_period_s=30, clock=clock) as prober:
        starting = [await probed(prober, clock, target) for _ in range(5)]  # 5 s of 30
        assert [(r.failures, r.starting) for r in starting] == [(0, True)] * 5
        error = starting[-1].health.error
        assert error is not None and error.startswith(f"liveness GET {target.base_url}/:")
        assert "starting: not counted until live or 30 s after the start" in error
        clock.now += 30
        after = [await probed(prober, clock, target) for _ in range(2)]
    assert [(r.failures, r.starting) for r in after] == [(1, False), (2, False)]
    assert after[-1].health.error is not None and "starting" not in after[-1].health.error


async def test_a_module_started_long_ago_counts_at_once() -> None:
    clock = Clock()
    target = silent(utcnow() - timedelta(hours=1))  # e.g. adopted after an agent restart
    async with HealthProber(start_period_s=120, clock=clock) as prober:
        results = [await probed(prober, clock, target) for _ in range(2)]
    assert [(r.failures, r.starting) for r in results] == [(1, False), (2, False)]


async def test_no_start_period_counts_from_the_first_probe() -> None:
    clock = Clock()
    target = silent(utcnow())
    async with HealthProber(start_period_s=0, clock=clock) as prober:
        results = [await probed(prober, clock, target) for _ in range(2)]
    assert [r.failures for r in results] == [1, 2]


async def test_slow_start_is_not_counted_then_live_ends_the_start_period(
    runtime: ProcessRuntime,
) -> None:
    """A real module probed from its first instant: the refused probes while Python and
    onnxruntime load are not counted; once it answered, a kill counts at once."""
    target = await start(runtime, "digits", health={"interval_s": 0.1, "failure_threshold": 1})
    clock = Clock()
    async with HealthProber(clock=clock) as prober:
        seen: list[HealthResult] = []
        live = await until(lambda: _live(prober, clock, target, seen), "the digits module to answer liveness")
        assert live.failures == 0 and not live.starting
        assert all(r.failures == 0 and r.starting for r in seen[:-1])  # refused while starting
        pid = runtime.records()["digits"].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await until(lambda: _exited(runtime), "the module to be gone")
        killed = await probed(prober, clock, target)
    assert killed.failures == 1 and not killed.starting


async def _live(
    prober: HealthProber, clock: Clock, target: ProbeTarget, seen: list[HealthResult]
) -> HealthResult | None:
    seen.append(await probed(prober, clock, target))
    return seen[-1] if seen[-1].health.live else None


async def test_a_server_that_never_answers_times_out() -> None:
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)  # read nothing, answer nothing

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with HealthProber() as prober:
            health = await prober.probe(f"http://127.0.0.1:{port}", HealthCheck(timeout_s=0.3))
        assert not health.live
        assert health.error == f"liveness GET http://127.0.0.1:{port}/: no answer within 0.3 s"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()
