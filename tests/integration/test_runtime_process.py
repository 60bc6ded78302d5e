"""ProcessRuntime against real ``python -m modules.scoring`` processes serving the digits model."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.actions import Create, Pull, Remove, Restart, Start, Stop
from agent.health import HealthProber
from agent.observed import ObservedModule, config_hash
from agent.runtime import RuntimeActionError, executors
from agent.runtime.process import ProcessRuntime, image_dir, proc_start_ticks
from modules.contract import DesiredModule, PortMapping
from tests.integration import module_image
from tests.integration.module_image import (
    CRASH_MESSAGE,
    CRASH_SCRIPT,
    DigitsBuild,
    scored_label,
    until,
    write_module_dir,
)
from tests.services import free_port

pytestmark = pytest.mark.integration
digits_build = module_image.digits_build

IMAGE = "localhost:5000/edge/digits:1"


@pytest.fixture
def images(tmp_path: Path, digits_build: DigitsBuild) -> Path:
    root = tmp_path / "images"
    write_module_dir(image_dir(root, IMAGE), digits_build)
    return root


@pytest.fixture
async def runtime(tmp_path: Path, images: Path) -> AsyncIterator[ProcessRuntime]:
    rt = ProcessRuntime(tmp_path / "state", images, stop_timeout_s=10)
    yield rt
    observed, _ = await rt.observe()
    for name in observed:
        await rt.remove(Remove(module=name, reason="test cleanup"))
    await rt.close()


def spec(port: int | None = None, **extra: object) -> DesiredModule:
    return DesiredModule.model_validate(
        {"image": IMAGE, "ports": [PortMapping(container=5001, host=port or free_port())], **extra}
    )


async def create_and_start(rt: ProcessRuntime, name: str, desired: DesiredModule) -> None:
    await rt.create(Create(module=name, spec=desired, config_hash=config_hash(desired), reason="test"))
    await rt.start(Start(module=name, reason="test"))


async def observed(rt: ProcessRuntime, name: str) -> ObservedModule | None:
    return (await rt.observe())[0].get(name)


async def exited(rt: ProcessRuntime, name: str) -> ObservedModule | None:
    o = await observed(rt, name)
    return o if o is not None and o.status == "exited" else None


async def ready(prober: HealthProber, url: str, desired: DesiredModule, instance: str | None = None) -> bool:
    return (await prober.probe(url, desired.health, instance)).ready


async def test_lifecycle_serves_the_model_and_reports_exit(
    runtime: ProcessRuntime, digits_build: DigitsBuild
) -> None:
    desired = spec()
    table = executors(runtime)
    await table["pull"](Pull(module="digits", image=IMAGE, reason="test"))
    await runtime.pulls.wait(IMAGE)
    _, images = await runtime.observe([IMAGE])
    assert images.is_present(IMAGE) and not images.failed

    create = Create(
        module="digits", spec=desired, config_hash=config_hash(desired), generation=12, reason="t"
    )
    await table["create"](create)
    created = await observed(runtime, "digits")
    assert created is not None and created.status == "created"
    assert created.config_hash == config_hash(desired) and created.image == IMAGE
    assert runtime.records()["digits"].generation == 12

    await table["start"](Start(module="digits", reason="test"))
    running = await observed(runtime, "digits")
    assert running is not None and running.status == "running" and running.exit_code is None
    url = runtime.health_url("digits", desired.health)
    assert url == f"http://127.0.0.1:{desired.ports[0].host}"
    assert running.instance is not None and running.instance == runtime.records()["digits"].instance
    async with HealthProber() as prober:
        # The module echoes the instance id the runtime gave it: the probe accepts only that.
        await until(lambda: ready(prober, url, desired, running.instance), "the digits module to be ready")
    assert await scored_label(url, digits_build.sample) == digits_build.expected_label

    await table["stop"](Stop(module="digits", reason="test"))
    stopped = await observed(runtime, "digits")
    assert stopped is not None and stopped.status == "exited"
    assert stopped.exit_code == 0  # SIGTERM: the server shuts down cleanly
    assert stopped.finished_at is not None and stopped.started_at is not None
    assert runtime.health_url("digits", desired.health) is None
    log = await runtime.logs("digits", tail=50)
    assert "scoring ready" in log and "scoring stopping" in log
    assert len((await runtime.logs("digits", tail=2)).splitlines()) == 2

    await table["remove"](Remove(module="digits", reason="test"))
    assert await observed(runtime, "digits") is None


async def test_module_env_tunes_the_server_but_cannot_move_it(
    runtime: ProcessRuntime, digits_build: DigitsBuild, caplog: pytest.LogCaptureFixture
) -> None:
    desired = spec(env={"PORT": "1", "HOST": "0.0.0.0", "MODEL_DIR": "/nowhere", "LOG_LEVEL": "DEBUG"})
    await create_and_start(runtime, "digits", desired)
    pid = runtime.records()["digits"].pid
    assert pid is not None
    raw = await asyncio.to_thread(Path(f"/proc/{pid}/environ").read_text)
    environ = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
    assert environ["PORT"] == str(desired.ports[0].host) and environ["HOST"] == "127.0.0.1"
    assert environ["MODEL_DIR"] != "/nowhere" and environ["LOG_LEVEL"] == "DEBUG"
    assert "env HOST, MODEL_DIR, PORT ignored" in caplog.text
    url = runtime.health_url("digits", desired.health)
    assert url is not None
    async with HealthProber() as prober:
        await until(lambda: ready(prober, url, desired), "the digits module to be ready")
    assert await scored_label(url, digits_build.sample) == digits_build.expected_label


async def test_crash_in_init_is_observed_with_its_exit_code(runtime: ProcessRuntime, images: Path) -> None:
    desired = spec(env={"ENTRY_SCRIPT": str(image_dir(images, IMAGE) / "src" / CRASH_SCRIPT)})
    await create_and_start(runtime, "crashy", desired)
    crashed = await until(lambda: exited(runtime, "crashy"), "the crashing module to exit")
    assert crashed.exit_code == 3  # EXIT_ON_INIT_FAILURE
    assert crashed.finished_at is not None
    assert CRASH_MESSAGE in await runtime.logs("crashy")
    await runtime.start(Start(module="crashy", reason="test: start again"))
    again = await until(lambda: exited(runtime, "crashy"), "the second crash")
    assert again.exit_code == 3 and again.started_at is not None and crashed.started_at is not None
    assert again.started_at > crashed.started_at


async def test_killed_process_reports_the_signal_like_docker(runtime: ProcessRuntime) -> None:
    await create_and_start(runtime, "victim", spec())
    pid = runtime.records()["victim"].pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    killed = await until(lambda: exited(runtime, "victim"), "the killed module to be seen as exited")
    assert killed.exit_code == 137


async def test_restart_starts_a_new_process(runtime: ProcessRuntime) -> None:
    await create_and_start(runtime, "digits", spec())
    first = runtime.records()["digits"].pid
    await runtime.restart(Restart(module="digits", reason="test"))
    again = await observed(runtime, "digits")
    assert again is not None and again.status == "running"
    assert runtime.records()["digits"].pid not in (None, first)
    assert first is not None and proc_start_ticks(first) is None


async def test_a_restarted_agent_adopts_running_processes(tmp_path: Path, images: Path) -> None:
    desired = spec()
    first = ProcessRuntime(tmp_path / "state", images)
    await create_and_start(first, "digits", desired)
    pid = first.records()["digits"].pid
    await first.close()  # the agent goes away; its module keeps running

    second = ProcessRuntime(tmp_path / "state", images)
    try:
        adopted = await observed(second, "digits")
        assert adopted is not None and adopted.status == "running"
        assert second.records()["digits"].pid == pid
        assert second.health_url("digits", desired.health) == f"http://127.0.0.1:{desired.ports[0].host}"
        async with HealthProber() as prober:
            url = second.health_url("digits", desired.health)
            assert url is not None
            await until(lambda: ready(prober, url, desired), "the adopted module to answer")
        await second.stop(Stop(module="digits", reason="test"))
        gone = await observed(second, "digits")
        assert gone is not None and gone.status == "exited"
        assert gone.exit_code is None  # not this runtime's child: its exit status is unknown
        assert pid is not None and proc_start_ticks(pid) is None
    finally:
        await second.remove(Remove(module="digits", reason="cleanup"))
        await second.close()


async def test_a_restarted_runtime_adopts_what_it_was_spawning_and_stops_orphans(
    tmp_path: Path, images: Path
) -> None:
    first = ProcessRuntime(tmp_path / "state", images)
    await create_and_start(first, "digits", spec())
    await create_and_start(first, "stray", spec())
    digits, stray = first.records()["digits"], first.records()["stray"]
    assert digits.pid is not None and stray.pid is not None and digits.instance is not None
    await first.close()
    # The agent was SIGKILLed between the spawn and recording the pid: only the intent is on disk.
    record_path = tmp_path / "state" / "modules" / "digits" / "record.json"
    record = json.loads(record_path.read_text())
    record.update(status="created", pid=None, pid_start=None, started_at=None)
    record_path.write_text(json.dumps(record))
    # And a module whose record is gone: its process is nobody's now.
    shutil.rmtree(tmp_path / "state" / "modules" / "stray")

    second = ProcessRuntime(tmp_path / "state", images, stop_timeout_s=5)
    try:
        adopted = await observed(second, "digits")
        assert adopted is not None and adopted.status == "running" and adopted.instance == digits.instance
        assert second.records()["digits"].pid == digits.pid  # adopted, not started twice
        assert proc_start_ticks(stray.pid) is None, "the orphan still runs"
        assert proc_start_ticks(digits.pid) == digits.pid_start
    finally:
        await second.remove(Remove(module="digits", reason="cleanup"))
        await second.close()


async def test_a_foreign_server_on_the_port_is_never_taken_for_the_module(
    tmp_path: Path, runtime: ProcessRuntime, images: Path
) -> None:
    port = free_port()
    desired = spec(port)
    # Someone else's ready scoring server holds the port (another runtime: not ours to stop).
    other = ProcessRuntime(tmp_path / "other-state", images)
    await create_and_start(other, "foreign", desired)
    try:
        async with HealthProber() as prober:
            url = f"http://127.0.0.1:{port}"
            await until(lambda: ready(prober, url, desired), "the foreign server to be ready")
            # The module deployed on that port crashes in init(): it must never look healthy.
            crashy = spec(port, env={"ENTRY_SCRIPT": str(image_dir(images, IMAGE) / "src" / CRASH_SCRIPT)})
            await create_and_start(runtime, "crashy", crashy)
            probed_while_running = 0
            while (o := await observed(runtime, "crashy")) is not None and o.status == "running":
                health = await prober.probe(url, crashy.health, o.instance)
                assert not health.live and not health.ready, (
                    f"the foreign server passed for the module: {health}"
                )
                assert "not by the module's instance" in (health.error or "")
                probed_while_running += 1
                await asyncio.sleep(0.05)
            assert probed_while_running >= 1, "the module exited before any probe: nothing was checked"
            assert o is not None and o.status == "exited" and o.instance is None
    finally:
        observed_other, _ = await other.observe()
        for name in observed_other:
            await other.remove(Remove(module=name, reason="test cleanup"))
        await other.close()


async def test_a_reused_pid_is_never_adopted_or_signalled(tmp_path: Path, images: Path) -> None:
    rt = ProcessRuntime(tmp_path / "state", images)
    desired = spec()
    await rt.create(Create(module="ghost", spec=desired, config_hash=config_hash(desired), reason="test"))
    record_path = tmp_path / "state" / "modules" / "ghost" / "record.json"
    record = json.loads(record_path.read_text())
    # The record names a live process (this test) with another start time: a pid reused after a reboot.
    record.update(status="running", pid=os.getpid(), pid_start="1", started_at="2026-01-01T00:00:00+00:00")
    record_path.write_text(json.dumps(record))
    seen = await observed(rt, "ghost")
    assert seen is not None and seen.status == "exited" and seen.exit_code is None
    await rt.stop(Stop(module="ghost", reason="test"))  # must not signal this process
    await rt.remove(Remove(module="ghost", reason="test"))
    await rt.close()


async def test_missing_module_directory_fails_the_pull_with_the_path(
    runtime: ProcessRuntime, images: Path
) -> None:
    missing = "localhost:5000/edge/absent@sha256:" + "cd" * 32
    await runtime.pull(Pull(module="absent", image=missing, reason="test"))
    await runtime.pulls.wait(missing)
    _, availability = await runtime.observe([missing, IMAGE])
    assert availability.present == {IMAGE}
    failure = availability.failed[missing]
    assert str(images / "localhost:5000/edge/absent" / ("sha256-" + "cd" * 32)) in failure.error
    assert failure.attempts == 1
    await runtime.pull(Pull(module="absent", image=missing, reason="retry"))
    await runtime.pulls.wait(missing)
    assert (await runtime.observe())[1].failed[missing].attempts == 2


async def test_bad_actions_name_the_module_and_the_cause(runtime: ProcessRuntime) -> None:
    with pytest.raises(RuntimeActionError, match=r"module nothing: no such module"):
        await runtime.start(Start(module="nothing", reason="test"))
    absent = DesiredModule(image="localhost:5000/edge/absent:9", ports=[PortMapping(container=5001)])
    with pytest.raises(
        RuntimeActionError, match=r"module x: image localhost:5000/edge/absent:9 is not present"
    ):
        await runtime.create(Create(module="x", spec=absent, config_hash=config_hash(absent), reason="t"))
    portless = DesiredModule(image=IMAGE)
    with pytest.raises(RuntimeActionError, match=r"needs a TCP port mapping \(container 5001\)"):
        await runtime.create(Create(module="x", spec=portless, config_hash=config_hash(portless), reason="t"))
    desired = spec()
    await runtime.create(Create(module="x", spec=desired, config_hash=config_hash(desired), reason="t"))
    with pytest.raises(RuntimeActionError, match=r"module x: already exists"):
        await runtime.create(Create(module="x", spec=desired, config_hash=config_hash(desired), reason="t"))
