"""DockerRuntime against a real Docker Engine and real registries.

Each test gets its own ``device_id`` (a label every container it creates carries, and a container
name prefix), so tests and other agents sharing the engine never see each other's containers.
Tests that run the scoring server use the ``module_image`` fixture (built FROM the cpu base
image); the rest use a tiny ``FROM scratch`` image and need no base.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from agent.actions import Create, Pull, Remove, Restart, Start, Stop
from agent.health import HealthProber
from agent.observed import ObservedModule, config_hash
from agent.runtime import RuntimeActionError, executors
from agent.runtime import labels as lb
from agent.runtime.docker import DockerRuntime
from modules.contract import DesiredModule, PortMapping, RegistryCredentialRef
from tests.integration import module_image
from tests.integration.module_image import (
    CRASH_MESSAGE,
    CRASH_SCRIPT,
    DigitsBuild,
    scored_label,
    scratch_image,
    until,
)
from tests.services import REPO_ROOT, RegistryServer, free_port, start_or_skip

pytestmark = pytest.mark.integration
digits_build = module_image.digits_build
module_image_fixture = module_image.module_image

SCRATCH = "edgedeploy-test/scratch:1"


LEAN_SDK = """\
import sys
import agent.runtime.docker
import requests.compat
from agent.runtime.docker import DockerRuntime

rt = DockerRuntime(device_id="lean-sdk-check")
print(requests.compat.chardet is None, "charset_normalizer" in sys.modules)
print(rt.client.version()["ApiVersion"])
"""


def test_the_sdk_runs_without_charset_detection(docker_client: Any) -> None:
    """A fresh agent process loads the SDK without charset_normalizer (no warning) and talks to
    the engine all the same."""
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", LEAN_SDK], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    first, api_version = done.stdout.splitlines()
    assert first == "True False"
    assert api_version == docker_client.version()["ApiVersion"]


@pytest.fixture(scope="module")
def scratch(docker_client: Any) -> str:
    return scratch_image(docker_client, SCRATCH)


@pytest.fixture
def device_id() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def runtime(docker_client: Any, device_id: str) -> AsyncIterator[DockerRuntime]:
    rt = DockerRuntime(
        docker_client,
        device_id=device_id,
        stop_timeout_s=10,  # containers: edge-<device>-<module>
    )
    yield rt
    await rt.pulls.close()
    for container in docker_client.containers.list(all=True, filters={"label": f"{lb.DEVICE}={device_id}"}):
        container.remove(force=True)


@pytest.fixture
def own_registry(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RegistryServer]:
    """A registry of this test's own, so stopping it leaves the session's registry alone."""
    workdir = tmp_path / "registry"
    workdir.mkdir()

    def start() -> RegistryServer:
        server = RegistryServer(workdir)
        server.start()
        return server

    server = start_or_skip(request.config, "registry", start)
    yield server
    server.stop()


def desired(image: str, **extra: Any) -> DesiredModule:
    return DesiredModule.model_validate({"image": image, **extra})


def served(image: str, **extra: Any) -> DesiredModule:
    return desired(image, ports=[PortMapping(container=5001, host=free_port())], **extra)


async def create(rt: DockerRuntime, name: str, spec: DesiredModule) -> None:
    await rt.create(Create(module=name, spec=spec, config_hash=config_hash(spec), reason="test"))


async def observed(rt: DockerRuntime, name: str) -> ObservedModule | None:
    return (await rt.observe())[0].get(name)


async def exited(rt: DockerRuntime, name: str) -> ObservedModule | None:
    o = await observed(rt, name)
    return o if o is not None and o.status == "exited" else None


async def ready(rt: DockerRuntime, prober: HealthProber, name: str, spec: DesiredModule) -> bool:
    """Ready, and answered by the container this runtime created (it echoes its instance id)."""
    o = (await rt.observe())[0].get(name)
    url = rt.health_url(name, spec.health)
    if o is None or url is None:
        return False
    assert o.instance is not None, "a running container must carry its instance id"
    return (await prober.probe(url, spec.health, o.instance)).ready


def push(client: Any, local: str, registry: RegistryServer, repository: str, tag: str) -> str:
    """Push ``local`` as ``registry/repository:tag``; return the pinned reference and drop the local
    names in that repository, so pulling it really goes to the registry."""
    target = f"{registry.address}/{repository}"
    client.images.get(local).tag(target, tag)
    for line in client.api.push(target, tag=tag, stream=True, decode=True):
        assert "error" not in line, line
    [digest_ref] = [
        d for d in client.images.get(f"{target}:{tag}").attrs["RepoDigests"] if d.startswith(target)
    ]
    for ref in (f"{target}:{tag}", digest_ref):
        try:
            client.images.remove(ref)
        except docker.errors.ImageNotFound:
            continue  # removing the tag dropped the digest name too
    assert not any(n.startswith(target) for n in client.images.get(local).attrs["RepoDigests"])
    return f"{target}:{tag}@{digest_ref.split('@', 1)[1]}"


# --- lifecycle ------------------------------------------------------------------------------------


async def test_lifecycle_of_a_served_module(
    runtime: DockerRuntime,
    docker_client: Any,
    module_image_fixture: str,
    digits_build: DigitsBuild,
    device_id: str,
) -> None:
    spec = served(module_image_fixture, resources={"cpus": 1.5, "memory_mb": 512}, version="7")
    table = executors(runtime)
    create = Create(module="digits", spec=spec, config_hash=config_hash(spec), generation=12, reason="test")
    await table["create"](create)
    created = await observed(runtime, "digits")
    assert created is not None and created.status == "created" and created.exit_code is None
    assert created.config_hash == config_hash(spec) and created.image == module_image_fixture

    info = docker_client.api.inspect_container(f"edge-{device_id}-digits")
    labels = info["Config"]["Labels"]
    names = (lb.MANAGED, lb.MODULE, lb.DEVICE, lb.CONFIG_HASH, lb.VERSION, lb.GENERATION)
    assert {k: labels[k] for k in names} == {
        lb.MANAGED: "true",
        lb.MODULE: "digits",
        lb.DEVICE: device_id,
        lb.CONFIG_HASH: config_hash(spec),
        lb.VERSION: "7",
        lb.GENERATION: "12",
    }
    host = info["HostConfig"]
    assert host["RestartPolicy"]["Name"] == "no" and host["Init"] is True
    assert host["PortBindings"] == {
        "5001/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(spec.ports[0].host)}]
    }
    assert host["NanoCpus"] == 1_500_000_000 and host["Memory"] == 512 * 1024 * 1024

    await table["start"](Start(module="digits", reason="test"))
    async with HealthProber() as prober:
        await until(lambda: ready(runtime, prober, "digits", spec), "the digits container to be ready")
    url = runtime.health_url("digits", spec.health)
    assert url == f"http://127.0.0.1:{spec.ports[0].host}"
    assert await scored_label(url, digits_build.sample) == digits_build.expected_label
    running = await observed(runtime, "digits")
    assert running is not None and running.status == "running" and running.started_at is not None
    assert running.image_id == docker_client.images.get(module_image_fixture).id  # no registry digest: the id

    await table["restart"](Restart(module="digits", reason="test"))
    again = await observed(runtime, "digits")
    assert again is not None and again.status == "running" and again.started_at is not None
    assert again.started_at > running.started_at
    async with HealthProber() as prober:
        await until(lambda: ready(runtime, prober, "digits", spec), "the restarted container to be ready")

    await table["stop"](Stop(module="digits", reason="test"))
    stopped = await observed(runtime, "digits")
    assert stopped is not None and stopped.status == "exited" and stopped.exit_code == 0
    assert stopped.finished_at is not None
    log = await runtime.logs("digits", tail=200)
    assert "scoring ready" in log
    assert len((await runtime.logs("digits", tail=3)).splitlines()) == 3

    await table["remove"](Remove(module="digits", reason="test"))
    assert await observed(runtime, "digits") is None
    with pytest.raises(docker.errors.NotFound):
        docker_client.containers.get(f"edge-{device_id}-digits")


async def test_crash_in_init_is_observed_as_exited_with_its_code(
    runtime: DockerRuntime, module_image_fixture: str
) -> None:
    spec = served(module_image_fixture, env={"ENTRY_SCRIPT": f"/module/src/{CRASH_SCRIPT}"})
    await create(runtime, "crashy", spec)
    await runtime.start(Start(module="crashy", reason="test"))
    crashed = await until(lambda: exited(runtime, "crashy"), "the crashing container to exit")
    assert crashed.exit_code == 3 and crashed.finished_at is not None
    assert CRASH_MESSAGE in await runtime.logs("crashy")


async def test_a_command_that_cannot_run_is_an_exit_not_a_created_module(
    runtime: DockerRuntime, docker_client: Any, scratch: str, device_id: str
) -> None:
    await create(runtime, "broken", desired(scratch))
    await runtime.start(Start(module="broken", reason="test"))  # the init process starts, exec fails
    seen = await until(lambda: exited(runtime, "broken"), "the broken module to exit")
    assert seen.exit_code is not None and seen.exit_code != 0
    assert "missing-binary" in await runtime.logs("broken")

    bare = DockerRuntime(docker_client, device_id=device_id, name_prefix=f"edge-{device_id}-", init=False)
    await create(bare, "bare", desired(scratch))
    with pytest.raises(RuntimeActionError, match=r"module bare: start failed: .*missing-binary"):
        await bare.start(Start(module="bare", reason="test"))
    failed = await observed(bare, "bare")
    assert failed is not None and failed.status == "exited"  # engine says created, with an error
    assert failed.exit_code is not None and failed.exit_code != 0


# --- ownership ------------------------------------------------------------------------------------


async def test_foreign_containers_are_never_listed_or_touched(
    runtime: DockerRuntime, docker_client: Any, scratch: str, device_id: str
) -> None:
    name = f"edge-{device_id}-digits"  # exactly the name our module would get
    foreign = docker_client.containers.create(scratch, name=name, labels={"owner": "someone else"})
    other_agent = docker_client.containers.create(
        scratch,
        name=f"edge-{device_id}-neighbour",
        labels={lb.MANAGED: "true", lb.MODULE: "neighbour", lb.DEVICE: "another-device"},
    )
    try:
        modules, _ = await runtime.observe()
        assert modules == {}
        with pytest.raises(RuntimeActionError, match=rf"a container named {name} already exists"):
            await create(runtime, "digits", desired(scratch))
        for action in (Start, Stop, Restart, Remove):
            with pytest.raises(RuntimeActionError, match=rf"container {name} is not managed by this agent"):
                await getattr(runtime, action.__name__.lower())(action(module="digits", reason="test"))
        with pytest.raises(RuntimeActionError, match="not managed by this agent"):
            await runtime.logs("digits")
        with pytest.raises(RuntimeActionError, match="not managed by this agent"):
            await runtime.remove(Remove(module="neighbour", reason="test"))
        foreign.reload()
        other_agent.reload()
        assert foreign.status == "created" and other_agent.status == "created"
    finally:
        foreign.remove(force=True)
        other_agent.remove(force=True)


async def test_profile_container_access_reaches_the_engine(
    runtime: DockerRuntime, docker_client: Any, scratch: str, device_id: str
) -> None:
    await create(runtime, "gpu", desired(scratch, profile="cuda"))
    await create(runtime, "stick", desired(scratch, profile="openvino-myriad"))
    gpu = docker_client.api.inspect_container(f"edge-{device_id}-gpu")["HostConfig"]
    [request] = gpu["DeviceRequests"]
    assert (request["Driver"], request["Count"], request["Capabilities"]) == ("nvidia", -1, [["gpu"]])
    stick = docker_client.api.inspect_container(f"edge-{device_id}-stick")["HostConfig"]
    assert stick["DeviceCgroupRules"] == ["c 189:* rmw"]
    assert stick["Binds"] == ["/dev/bus/usb:/dev/bus/usb"]
    assert not stick["Privileged"]
    modules, _ = await runtime.observe()
    assert sorted(modules) == ["gpu", "stick"]
    with pytest.raises(RuntimeActionError, match=r"module x: device profile 'nope' is unknown"):
        await create(runtime, "x", desired(scratch, profile="nope"))


# --- pulls ----------------------------------------------------------------------------------------


async def test_pull_from_the_registry_then_offline_start_skips_the_pull(
    runtime: DockerRuntime, docker_client: Any, module_image_fixture: str, own_registry: RegistryServer
) -> None:
    pinned = push(docker_client, module_image_fixture, own_registry, "edge/digits", "1")
    digest = pinned.split("@", 1)[1]
    _, before = await runtime.observe([pinned])
    assert not before.is_present(pinned)
    await runtime.pull(Pull(module="digits", image=pinned, reason="test"))
    await runtime.pulls.wait(pinned)
    _, after = await runtime.observe([pinned])
    assert after.is_present(pinned) and not after.failed

    own_registry.stop()  # the device goes offline
    await runtime.pull(Pull(module="digits", image=pinned, reason="boot again"))
    await runtime.pulls.wait(pinned)
    _, offline = await runtime.observe([pinned])
    assert offline.is_present(pinned) and not offline.failed  # skipped: the digest is here

    spec = served(pinned)
    try:
        await create(runtime, "digits", spec)
        await runtime.start(Start(module="digits", reason="test"))
        async with HealthProber() as prober:
            await until(
                lambda: ready(runtime, prober, "digits", spec), "the offline-started module to be ready"
            )
        running = await observed(runtime, "digits")
        assert running is not None and running.image == pinned and running.image_id == digest
    finally:
        await runtime.remove(Remove(module="digits", reason="cleanup"))
        docker_client.images.remove(f"{own_registry.address}/edge/digits@{digest}")


async def test_a_registry_that_is_down_fails_one_pull_and_nothing_else(
    runtime: DockerRuntime, docker_client: Any, scratch: str, own_registry: RegistryServer
) -> None:
    await create(runtime, "steady", desired(scratch))
    address = own_registry.address
    own_registry.stop()
    missing = f"{address}/edge/unreachable:2"
    await runtime.pull(Pull(module="late", image=missing, reason="test"))
    _, during = await runtime.observe([missing])
    assert during.is_pulling(missing) or missing in during.failed  # pull() returned without waiting
    await runtime.pulls.wait(missing)
    modules, images = await runtime.observe([missing, scratch])
    failure = images.failed[missing]
    assert not failure.error.startswith("pull of"), "the cause only: reports add the prefix once"
    assert "connection refused" in failure.error
    assert failure.attempts == 1 and not images.is_pulling(missing)
    assert images.is_present(scratch)
    assert modules["steady"].status == "created"  # the other module is untouched
    await create(runtime, "other", desired(scratch))  # and the runtime keeps working
    assert sorted((await runtime.observe())[0]) == ["other", "steady"]


async def test_missing_registry_secret_fails_the_pull_by_name(
    runtime: DockerRuntime, registry: RegistryServer
) -> None:
    image = f"{registry.address}/edge/private:1"
    ref = RegistryCredentialRef(registry=registry.address, secret="site-registry")
    await runtime.pull(Pull(module="p", image=image, credentials=ref, reason="test"))
    await runtime.pulls.wait(image)
    failure = (await runtime.observe())[1].failed[image]
    assert "registry credential 'site-registry'" in failure.error
    assert "not in the agent's secret store" in failure.error


async def test_pull_with_credentials_from_the_secret_store(
    docker_client: Any, device_id: str, scratch: str, registry: RegistryServer
) -> None:
    pinned = push(docker_client, scratch, registry, f"edge/{device_id}", "1")
    rt = DockerRuntime(
        docker_client, device_id=device_id, credentials={"site-registry": ("puller", "s3cret")}
    )
    ref = RegistryCredentialRef(registry=registry.address, secret="site-registry")
    await rt.pull(Pull(module="p", image=pinned, credentials=ref, reason="test"))
    await rt.pulls.wait(pinned)
    _, images = await rt.observe()
    assert images.is_present(pinned) and not images.failed


async def test_an_unknown_image_fails_with_the_registry_answer(
    runtime: DockerRuntime, registry: RegistryServer
) -> None:
    image = f"{registry.address}/edge/never-pushed:1"
    await runtime.pull(Pull(module="ghost", image=image, reason="test"))
    await runtime.pulls.wait(image)
    failure = (await runtime.observe())[1].failed[image]
    assert not failure.error.startswith("pull of"), "the cause only: reports add the prefix once"
    assert "not found" in failure.error.lower() or "unknown" in failure.error.lower()
