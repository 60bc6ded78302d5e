"""Profile fallback on the device, with the real agent, Mosquitto and Docker Engine.

This machine has no GPU. A ``tensorrt`` module whose accelerator the agent does not detect runs
its ``cpu`` fallback image from the start; one the agent believes present makes Docker Engine
answer ``could not select device driver "nvidia"``, and the agent falls back to ``cpu`` instead
of looping on the failed start. The report says which profile runs and why. A strict profile
keeps failing loudly.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration import module_image as images
from tests.integration.agent_rig import module_running, running_agent
from tests.integration.test_agent_docker import DockerDevice, device, spec

pytestmark = pytest.mark.integration
digits_build = images.digits_build
module_image = images.module_image
__all__ = ["device", "digits_build", "module_image"]


def gpu_module(device: DockerDevice) -> dict[str, Any]:
    """The module as the cloud sends it to a tensorrt device: tensorrt image first, cpu as fallback."""
    fallbacks = [{"profile": "cpu", "image": device.image}]
    return {device.web: spec(device.image, profile="tensorrt", fallbacks=fallbacks)}


async def test_an_undetected_accelerator_runs_the_fallback_image_from_the_start(device: DockerDevice) -> None:
    async with running_agent(device.config, device.runtime(), device.keys, present_profiles=["cpu"]):
        device.publish(gpu_module(device))
        report = await device.cloud.report(module_running(device.web), "the cpu fallback running", 180)
    status = report.modules[device.web]
    assert status.profile == "cpu"
    assert status.profile_note == "tensorrt not detected on this device: runs the cpu image"
    assert report.deployment_status in ("applying", "healthy")


async def test_a_start_that_fails_for_the_accelerator_falls_back_and_says_why(device: DockerDevice) -> None:
    async with running_agent(
        device.config, device.runtime(), device.keys, present_profiles=["tensorrt", "cpu"]
    ):
        device.publish(gpu_module(device))
        report = await device.cloud.report(module_running(device.web), "the cpu fallback running", 180)
    status = report.modules[device.web]
    assert status.profile == "cpu"
    assert status.profile_note is not None
    assert status.profile_note.startswith("tensorrt failed to start (")
    assert "nvidia" in status.profile_note.lower()
    assert status.profile_note.endswith("): runs the cpu image")
    [container] = device.containers().values()
    assert not container.attrs["HostConfig"].get("DeviceRequests"), "the cpu fallback asks for no GPU"


async def test_a_strict_profile_keeps_failing_loudly(device: DockerDevice) -> None:
    runtime = device.runtime()
    async with running_agent(
        device.config, runtime, device.keys, present_profiles=["tensorrt", "cpu"]
    ) as agent:
        agent.strict_profiles = frozenset({"tensorrt"})
        device.publish(gpu_module(device))

        def failed_on_nvidia(r: Any) -> bool:
            m = r.modules.get(device.web)
            return bool(m and m.profile == "tensorrt" and m.message and "nvidia" in m.message.lower())

        report = await device.cloud.report(
            failed_on_nvidia, "the strict module failing on the GPU request", 120
        )
    status = report.modules[device.web]
    assert status.runtime_status == "failed" and status.profile_note is None
