"""Modules for runtime tests: an unpacked digits module directory, and a module image built FROM the cpu base.

``write_module_dir`` lays out a module the way ``/module`` looks inside an image (``module.json``,
``models/digits/1/model.onnx``, ``src/crash_score.py``); the process runtime runs it as is.

``module_image`` (session fixture) builds a small image with the docker SDK: the cpu profile's base
image (``cloud.packaging.base``: Debian + python3 + onnxruntime + aiohttp ...), the ``modules``
package, the device profiles and that module directory. The base is used when Docker Engine has
it (named by its inputs hash); otherwise ``ensure_base_image`` builds it from Debian and PyPI
(minutes, once; cached), unless ``EDGE_TEST_BUILD_BASE=0``. When no base can be had, the tests
that need the image are skipped with the reason. The image is tagged with a hash of its inputs,
so later sessions reuse it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.services import REPO_ROOT, ServiceUnavailable, ledger

IMAGE_REPOSITORY = "edgedeploy-test/module-digits"
CRASH_SCRIPT = "crash_score.py"
CRASH_MESSAGE = "this module cannot start: the model licence expired"
BUILD_BASE_ENV = "EDGE_TEST_BUILD_BASE"

CRASH_SOURCE = f'''\
"""An entry script whose init() fails: the scoring server exits with status 3."""


def init():
    raise RuntimeError("{CRASH_MESSAGE}")


def run(data):
    return data
'''

DOCKERFILE = """\
FROM {base}
COPY modules /opt/edgedeploy/modules
COPY device-profiles /module/profiles
COPY module /module
ENV PYTHONPATH=/opt/edgedeploy PYTHONUNBUFFERED=1
EXPOSE 5001
CMD ["python3", "-m", "modules.scoring"]
"""


@dataclass(frozen=True)
class DigitsBuild:
    """The digits example built once: its folder (model.onnx, module.json, sample.json, expected.json)."""

    folder: Path

    @property
    def sample(self) -> bytes:
        """A request body for ``POST /score``."""
        return (self.folder / "sample.json").read_bytes()

    @property
    def expected_label(self) -> int:
        """The true label of the sample."""
        return int(json.loads((self.folder / "expected.json").read_text())["label"])


def build_digits(folder: Path) -> DigitsBuild:
    """Train and convert the digits example into ``folder``."""
    from modules.examples.digits import build_digits_onnx

    build_digits_onnx(folder)
    return DigitsBuild(folder)


def write_module_dir(dest: Path, digits: DigitsBuild) -> Path:
    """Lay out the digits module in ``dest`` as ``/module`` is inside an image; returns ``dest``."""
    model_dir = dest / "models" / "digits" / "1"
    model_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(digits.folder / "model.onnx", model_dir / "model.onnx")
    shutil.copy(digits.folder / "module.json", dest / "module.json")
    (dest / "src").mkdir(exist_ok=True)
    (dest / "src" / CRASH_SCRIPT).write_text(textwrap.dedent(CRASH_SOURCE))
    return dest


@pytest.fixture(scope="session")
def digits_build(tmp_path_factory: pytest.TempPathFactory) -> DigitsBuild:
    """The digits example, built once per session."""
    return build_digits(tmp_path_factory.mktemp("digits-build"))


def _context_hash(context: Path, base_id: str) -> str:
    digest = hashlib.sha256(base_id.encode())
    for path in sorted(p for p in context.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(context)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _find_base(client: Any) -> str:
    """The cpu base image in Docker Engine: the one for the current inputs, else any cpu base
    (an older build serves these tests as well), else one built now unless told not to."""
    import docker.errors

    try:
        from cloud.packaging.base import (
            LABEL_INPUTS,
            LABEL_PROFILE,
            ensure_base_image,
            inputs_hash,
            repository_path,
        )
        from modules.profiles import get_profile
    except ImportError as exc:
        raise ServiceUnavailable(f"cloud.packaging base images are not importable ({exc})") from exc
    profile = get_profile("cpu")
    key = inputs_hash(profile)
    local = f"{repository_path(profile.base.image)}:{key[:16]}"
    try:
        if (client.images.get(local).labels or {}).get(LABEL_INPUTS) == key:
            return local
    except docker.errors.ImageNotFound:
        pass
    older = client.images.list(filters={"label": f"{LABEL_PROFILE}=cpu"})
    if older:
        return str(older[0].id)
    if os.environ.get(BUILD_BASE_ENV, "1") == "0":
        raise ServiceUnavailable(
            f"no cpu base image in Docker Engine ({local}) and {BUILD_BASE_ENV}=0 forbids building it "
            "(build it with cloud.packaging.base.ensure_base_image('cpu', None))"
        )
    try:
        return ensure_base_image(profile, None, client=client)
    except Exception as exc:
        raise ServiceUnavailable(
            f"the cpu base image could not be built: {type(exc).__name__}: {exc}"
        ) from exc


def _build_module_image(client: Any, work: Path, digits: DigitsBuild) -> str:
    base = _find_base(client)
    context = work / "context"
    shutil.copytree(
        REPO_ROOT / "modules",
        context / "modules",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "examples"),
    )
    shutil.copytree(REPO_ROOT / "device-profiles", context / "device-profiles")
    write_module_dir(context / "module", digits)
    (context / "Dockerfile").write_text(DOCKERFILE.format(base=base))
    tag = f"{IMAGE_REPOSITORY}:{_context_hash(context, client.images.get(base).id)}"
    try:
        client.images.get(tag)
        return tag
    except Exception:
        pass
    try:
        client.images.build(path=str(context), tag=tag, rm=True, forcerm=True, pull=False)
    except Exception as exc:
        raise ServiceUnavailable(f"building the module image FROM {base} failed: {exc}") from exc
    for old in client.images.list(IMAGE_REPOSITORY):  # images of earlier checkouts
        for name in old.tags:
            if name != tag:
                with contextlib.suppress(Exception):
                    client.images.remove(name)
    return tag


@pytest.fixture(scope="session")
def module_image(
    request: pytest.FixtureRequest,
    docker_client: Any,
    digits_build: DigitsBuild,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[str]:
    """A local module image serving the digits model on port 5001 (``/module/src/crash_score.py`` inside)."""
    try:
        tag = _build_module_image(docker_client, tmp_path_factory.mktemp("module-image"), digits_build)
    except ServiceUnavailable as exc:
        ledger(request.config).skipped.setdefault("docker", f"module image unavailable: {exc.reason}")
        pytest.skip(f"MODULE IMAGE UNAVAILABLE: {exc.reason}")
    yield tag


START_LIMIT_S = 120.0
"""How long a module may take to become ready before a test fails (a bound, not an assertion)."""


async def until(check: Any, what: str, limit_s: float = START_LIMIT_S) -> Any:
    """Poll the coroutine function ``check`` until it returns something truthy; fail naming ``what``."""
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit_s
    while True:
        result = await check()
        if result:
            return result
        if loop.time() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {limit_s:g} s (last: {result!r})")
        await asyncio.sleep(0.1)


async def scored_label(base_url: str, body: bytes) -> int:
    """``POST /score`` the digits sample and return the predicted label."""
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            base_url + "/score", data=body, headers={"Content-Type": "application/json"}
        ) as response,
    ):
        answer = await response.json()
        assert response.status == 200, answer
    [label] = answer["outputs"]["label"]
    return int(label)


def scratch_image(client: Any, tag: str, command: str = "/missing-binary") -> str:
    """A tiny image (``FROM scratch``, one text file) whose command does not exist: it can be
    created, pushed and pulled, and its start fails like a broken image's would."""
    import io
    import tarfile

    dockerfile = f'FROM scratch\nCOPY note.txt /note.txt\nCMD ["{command}"]\n'.encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, data in (("Dockerfile", dockerfile), ("note.txt", b"edgedeploy runtime test\n")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    client.images.build(fileobj=buffer, custom_context=True, tag=tag, rm=True, pull=False)
    return tag
