"""Base images on real parts: debootstrap + PyPI → Docker Engine → CNCF registry, cached by inputs.

The first session on a machine builds the cpu base from Debian (minutes); later sessions find it
in Docker Engine by its inputs hash and only push it to this session's registry. When the base
cannot be built here (not root, no debootstrap, no Debian mirror), the tests skip saying why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker.errors
import pytest

from cloud.packaging.base import LABEL_INPUTS, ensure_base_image, inputs_hash, repository_path
from cloud.packaging.errors import BaseImageUnavailable, PackagingError
from cloud.packaging.registry_client import RegistryClient
from modules.profiles import get_profile
from tests.services import RegistryServer, start_or_skip

pytestmark = pytest.mark.integration


class Recorder:
    """Keeps every progress line, for asserting what packaging did."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def step(self, message: str) -> None:
        self.lines.append(message)

    def transfer(self, label: str, done: int, total: int | None) -> None:
        self.lines.append(f"{label}: {done}/{total}")

    def text(self) -> str:
        return "\n".join(self.lines)


def cpu_base_or_skip(registry: Any, docker_client: Any, progress: Any = None) -> str:
    """The cpu base image pushed to ``registry`` (built once per machine), or a loud skip."""
    try:
        return ensure_base_image(
            "cpu", registry.address, client=docker_client, progress=progress or Recorder()
        )
    except PackagingError as exc:
        pytest.skip(f"CPU BASE IMAGE CANNOT BE BUILT HERE: {exc}")


def forget_reference(docker_client: Any, ref: str) -> None:
    """Drop a ``registry/repo@digest`` reference from Docker Engine (the image stays while tagged)."""
    with contextlib.suppress(docker.errors.APIError):
        docker_client.images.remove(ref)


@pytest.fixture(scope="session")
def cpu_base(registry: Any, docker_client: Any) -> Iterator[str]:
    """``registry/edgedeploy/base-cpu@sha256:…`` for this session's registry."""
    ref = cpu_base_or_skip(registry, docker_client)
    yield ref
    forget_reference(docker_client, ref)


def test_second_build_is_cached(cpu_base: str, registry: Any, docker_client: Any) -> None:
    progress = Recorder()
    again = ensure_base_image("cpu", registry.address, client=docker_client, progress=progress)
    assert again == cpu_base
    assert "cached as" in progress.text()
    assert "debootstrap" not in progress.text()
    assert "pushing" not in progress.text()

    profile = get_profile("cpu")
    repo = repository_path(profile.base.image)
    key = inputs_hash(profile)
    manifest = RegistryClient(registry.address).get_manifest(repo, key[:16])
    assert manifest is not None, "the base is not in the registry under its inputs hash"
    local = docker_client.images.get(f"{repo}:{key[:16]}")
    assert local.labels[LABEL_INPUTS] == key
    assert cpu_base.startswith(f"{registry.address}/{repo}@sha256:")


def test_base_runs_the_scoring_runtimes_imports(cpu_base: str, docker_client: Any) -> None:
    code = (
        "import aiohttp, numpy, onnxruntime, orjson, pydantic, uvloop, yaml; print(onnxruntime.__version__)"
    )
    out = docker_client.containers.run(cpu_base, ["python3", "-c", code], remove=True)
    assert out.decode().strip() == "1.31.1"
    size_mb = docker_client.images.get(cpu_base).attrs["Size"] / 1e6
    print(f"cpu base image: {size_mb:.0f} MB uncompressed")


def test_a_new_registry_gets_the_cached_base_without_a_rebuild(
    cpu_base: str, docker_client: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    fresh = start_or_skip(request.config, "registry", lambda: _start_registry(tmp_path))
    try:
        progress = Recorder()
        ref = ensure_base_image("cpu", fresh.address, client=docker_client, progress=progress)
        assert "debootstrap" not in progress.text()
        assert "pushing base image" in progress.text()
        assert ref.split("@")[1] == cpu_base.split("@")[1], "same inputs must give the same manifest digest"
        forget_reference(docker_client, ref)
    finally:
        fresh.stop()


def _start_registry(workdir: Path) -> RegistryServer:
    server = RegistryServer(workdir)
    server.start()
    return server


def test_vendor_base_that_is_not_here_is_a_clear_error(registry: Any, docker_client: Any) -> None:
    with pytest.raises(BaseImageUnavailable) as err:
        ensure_base_image("openvino-myriad", registry.address, client=docker_client, progress=Recorder())
    message = str(err.value)
    assert "\n" not in message
    assert "base-openvino-vpu:2022.3.1-ubuntu20-py310" in message
    assert "docker load" in message
    assert "openvino/ubuntu20_runtime:2022.3.1" in message
