"""``edgectl package`` on real parts: model registry → module image → Docker Engine → CNCF registry.

The digits models are trained here (scikit-learn's bundled load_digits, skl2onnx), registered in
a model registry in a temp data dir, packaged for the cpu profile, pushed, pulled by digest, run
and scored. Re-packaging gives the same digest; a new model version pushes only its model layer;
broken inputs and a failing registry give one-line errors and leave no tags behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import textwrap
import time
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker.errors
import numpy as np
import pytest

from cloud.commands.base import CliError, add_global_options
from cloud.commands.package import register
from cloud.config import resolve_settings
from cloud.inference_config import InferenceConfig
from cloud.packaging.context import ModelInput
from cloud.packaging.errors import (
    BaseImageUnavailable,
    DiskFullError,
    InputError,
    RegistryError,
    SmokeTestError,
)
from cloud.packaging.models import models_from_registry
from cloud.packaging.package import STAGING_REPO, PackagedImage, PackageRequest, package
from cloud.packaging.profiling import profile_image
from cloud.packaging.registry_client import RegistryClient
from cloud.store import Registry
from tests.integration.test_base_image import Recorder, cpu_base_or_skip, forget_reference
from tests.services import RegistryServer, free_port, start_or_skip

pytestmark = pytest.mark.integration


# ------------------------------------------------------------------------------------------ models


def train_digits(out_dir: Path, hidden: tuple[int, ...], seed: int) -> Path:
    """An MLP on load_digits as ONNX (input float_input [-1, 64], outputs label and probabilities)."""
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MLPClassifier(hidden_layer_sizes=hidden, max_iter=25, random_state=seed).fit(x, y)
    onx = to_onnx(
        clf,
        initial_types=[("float_input", FloatTensorType([None, 64]))],
        options={id(clf): {"zipmap": False}},
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model.onnx").write_bytes(onx.SerializeToString())
    return out_dir


@dataclass(frozen=True)
class Digits:
    """Two registered versions of the digits model and a sample with the label the model gives it."""

    store: Registry
    sample: dict[str, Any]
    v1_label: int
    v2_size: int

    def models(self, ref: str) -> list[ModelInput]:
        return models_from_registry(self.store, [ref])


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Digits]:
    import onnxruntime as ort
    from sklearn.datasets import load_digits

    root = tmp_path_factory.mktemp("digits")
    store = Registry.open(resolve_settings(root / "data"))
    v1 = train_digits(root / "v1", (256,), seed=0)
    v2 = train_digits(root / "v2", (1024, 256), seed=1)
    store.register(v1, "digits")
    store.register(v2, "digits")
    x = (load_digits().data[:1] / 16.0).astype(np.float32)
    session = ort.InferenceSession(str(v1 / "model.onnx"), providers=["CPUExecutionProvider"])
    label = int(session.run(["label"], {"float_input": x})[0][0])
    yield Digits(store, {"data": x.tolist()}, label, (v2 / "model.onnx").stat().st_size)
    store.close()


@pytest.fixture(scope="module")
def base(registry: Any, docker_client: Any) -> Iterator[str]:
    ref = cpu_base_or_skip(registry, docker_client)
    yield ref
    forget_reference(docker_client, ref)


@pytest.fixture(scope="module")
def tags(docker_client: Any) -> Iterator[list[str]]:
    """Local tags and pulled digest references the tests create; removed at the end."""
    made: list[str] = []
    yield made
    for tag in made:
        with contextlib.suppress(docker.errors.APIError):
            docker_client.images.remove(tag, noprune=False)


def _package(
    request: PackageRequest, client: Any, tags: list[str], progress: Recorder | None = None
) -> PackagedImage:
    [result] = package(request, client=client, progress=progress or Recorder())
    tags.extend(ref for ref in (result.local_tag, result.ref) if ref)
    return result


@pytest.fixture(scope="module")
def packaged_v1(
    base: str, digits: Digits, registry: Any, docker_client: Any, tags: list[str]
) -> PackagedImage:
    request = PackageRequest(
        models=digits.models("digits:1"),
        config=InferenceConfig(input_sample=digits.sample),
        profiles=["cpu"],
        registry=registry.address,
    )
    return _package(request, docker_client, tags)


def _score(client: Any, image: str, body: bytes, path: str = "/score") -> Any:
    container = client.containers.run(image, detach=True, ports={"5001/tcp": ("127.0.0.1",)})
    try:
        from cloud.packaging.smoke import wait_ready

        port = wait_ready(container, image, 120)
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}{path}", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())
    finally:
        container.remove(force=True)


def test_a_module_without_a_published_port_fails_at_once(
    packaged_v1: PackagedImage, docker_client: Any
) -> None:
    from cloud.packaging.smoke import NO_PORT_GRACE_S, wait_ready

    container = docker_client.containers.run(packaged_v1.ref, detach=True, network_mode="none")
    try:
        started = time.monotonic()
        with pytest.raises(SmokeTestError, match="published no host port for the module's port 5001/tcp"):
            wait_ready(container, "digits 1 (cpu)", 120)
        assert time.monotonic() - started < 60, (
            f"said so after ~{NO_PORT_GRACE_S} s, not at the 120 s timeout"
        )
    finally:
        container.remove(force=True)


def _no_tags_for(client: Any, registry: Any, repository: str) -> None:
    names = [t for image in client.images.list() for t in image.tags]
    leftovers = [t for t in names if f"/{repository}:" in t or t.startswith(f"{STAGING_REPO}/{repository}:")]
    assert leftovers == [], f"dangling tags: {leftovers}"
    assert RegistryClient(registry.address).get_manifest(repository, "1-cpu") is None


# ------------------------------------------------------------------------------------------ tests


def test_package_push_pull_run_and_score(
    packaged_v1: PackagedImage, digits: Digits, registry: Any, docker_client: Any
) -> None:
    assert packaged_v1.ref is not None
    assert packaged_v1.ref.startswith(f"{registry.address}/digits@sha256:")
    assert [name for name, _, _ in packaged_v1.layers] == ["runtime", "models"]
    manifest = RegistryClient(registry.address).get_manifest("digits", "1-cpu")
    assert manifest is not None
    assert json.loads(manifest[0])["layers"][-1]["digest"] == packaged_v1.layers[-1][2], "model layer is last"

    docker_client.images.pull(packaged_v1.ref)
    answer = _score(docker_client, packaged_v1.ref, json.dumps(digits.sample).encode())
    assert answer["outputs"]["label"] == [digits.v1_label]

    inside = docker_client.containers.run(
        packaged_v1.ref,
        ["python3", "-c", "import json; print(open('/module/module.json').read())"],
        remove=True,
    )
    info = json.loads(inside)
    assert info["models"] == [{"name": "digits", "version": 1, "files": ["model.onnx"]}]
    env = docker_client.images.get(packaged_v1.ref).attrs["Config"]["Env"]
    assert "MODEL_DIR=/module/models/digits/1" in env
    assert "AZUREML_MODEL_DIR=/module/models/digits/1" in env
    assert "PROFILE=cpu" in env


def test_repackaging_gives_the_same_digest(
    packaged_v1: PackagedImage, digits: Digits, registry: Any, docker_client: Any, tags: list[str]
) -> None:
    request = PackageRequest(
        models=digits.models("digits:1"),
        config=InferenceConfig(input_sample=digits.sample),
        profiles=["cpu"],
        registry=registry.address,
    )
    again = _package(request, docker_client, tags)
    assert (again.ref, again.layers) == (packaged_v1.ref, packaged_v1.layers)
    assert again.image_id == packaged_v1.image_id
    assert again.push is not None and again.push.uploaded == []


def test_new_model_version_pushes_only_the_model_layer(
    packaged_v1: PackagedImage, digits: Digits, registry: Any, docker_client: Any, tags: list[str]
) -> None:
    request = PackageRequest(
        models=digits.models("digits:2"),
        config=InferenceConfig(input_sample=digits.sample),
        profiles=["cpu"],
        registry=registry.address,
    )
    v2 = _package(request, docker_client, tags)
    assert v2.ref != packaged_v1.ref
    assert v2.push is not None
    model_layer = v2.layers[-1][2]
    assert v2.layers[0] == packaged_v1.layers[0], "the runtime layer must be reused"
    assert v2.push.uploaded == [model_layer, v2.image_id], "only the model layer and the config are uploaded"
    ratio = v2.bytes_pushed / digits.v2_size
    print(
        f"model-only update: {v2.bytes_pushed} bytes pushed for a {digits.v2_size}-byte model ({ratio:.3f}x)"
    )
    assert 0.5 <= ratio <= 1.05


def test_entry_script_with_sources_requirements_and_env(
    base: str, digits: Digits, registry: Any, docker_client: Any, tags: list[str], tmp_path: Path
) -> None:
    (tmp_path / "helpers.py").write_text(
        "import numpy as np\n\n\ndef prepare(rows):\n    return np.asarray(rows, dtype=np.float32)\n"
    )
    (tmp_path / "score.py").write_text(
        textwrap.dedent(
            """\
            import json
            import os

            import onnxruntime as ort
            from tabulate import tabulate

            from helpers import prepare

            session = None


            def init():
                global session
                path = os.path.join(os.environ["AZUREML_MODEL_DIR"], "model.onnx")
                session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])


            def run(raw):
                rows = prepare(json.loads(raw)["data"])
                label = session.run(["label"], {"float_input": rows})[0]
                table = tabulate([[1, 2]])
                return {"label": label.tolist(), "greeting": os.environ["GREETING"], "table": table}
            """
        )
    )
    (tmp_path / "inference.yaml").write_text(
        "entry_script: score.py\nsource_files: [helpers.py]\nrequirements: [tabulate==0.9.0]\n"
        "env: {GREETING: hello}\n" + f"input_sample: {json.dumps(digits.sample)}\n"
    )
    from cloud.inference_config import load_inference_config

    request = PackageRequest(
        models=digits.models("digits:1"),
        config=load_inference_config(tmp_path / "inference.yaml"),
        profiles=["cpu"],
        name="digits-script",
        registry=registry.address,
    )
    result = _package(request, docker_client, tags)
    assert [name for name, _, _ in result.layers] == ["python-deps", "runtime", "src", "models"]
    assert result.ref is not None
    answer = _score(docker_client, result.ref, json.dumps(digits.sample).encode())
    assert answer["label"] == [digits.v1_label]
    assert answer["greeting"] == "hello"
    assert "1  2" in answer["table"]


def test_dockerfile_context_builds_with_plain_docker_build(
    base: str, digits: Digits, registry: Any, docker_client: Any, tags: list[str], tmp_path: Path
) -> None:
    out = tmp_path / "context"
    request = PackageRequest(
        models=digits.models("digits:1"),
        config=InferenceConfig(),
        profiles=["cpu"],
        registry=registry.address,
        dockerfile_dir=out,
    )
    [result] = package(request, client=docker_client, progress=Recorder())
    assert result.dockerfile == out / "Dockerfile"
    dockerfile = (out / "Dockerfile").read_text()
    assert f"FROM {base}" in dockerfile
    tag = "edgedeploy-test/digits-from-dockerfile:1"
    docker_client.images.build(path=str(out), tag=tag, rm=True, pull=False)
    tags.append(tag)
    answer = _score(docker_client, tag, json.dumps(digits.sample).encode())
    assert answer["outputs"]["label"] == [digits.v1_label]


def test_broken_entry_script_is_caught_before_push(
    base: str, digits: Digits, registry: Any, docker_client: Any, tmp_path: Path
) -> None:
    (tmp_path / "score.py").write_text(
        "def init():\n    raise RuntimeError('the model licence expired')\n\n\n"
        "def run(data):\n    return data\n"
    )
    config = InferenceConfig(entry_script="score.py")
    config._base_dir = tmp_path
    request = PackageRequest(
        models=digits.models("digits:1"),
        config=config,
        profiles=["cpu"],
        name="broken",
        registry=registry.address,
    )
    with pytest.raises(SmokeTestError) as err:
        package(request, client=docker_client, progress=Recorder())
    assert "\n" not in str(err.value)
    assert "smoke check of broken 1 (cpu) failed: the module exited with code" in str(err.value)
    assert "the model licence expired" in err.value.log_tail
    _no_tags_for(docker_client, registry, "broken")


def test_entry_script_without_run_is_refused_by_the_cli(
    digits: Digits, registry: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "score.py").write_text("def init():\n    pass\n")
    (tmp_path / "inference.yaml").write_text("entry_script: score.py\n")
    parser = argparse.ArgumentParser()
    add_global_options(parser)
    register(parser.add_subparsers())
    data_dir = str(digits.store.blobs.root.parent)
    config = str(tmp_path / "inference.yaml")
    argv = ["--data-dir", data_dir, "package", "--model", "digits:1", "--config", config, "--profile", "cpu"]
    args = parser.parse_args([*argv, "--registry", registry.address])
    with pytest.raises(CliError) as err:
        args.func(args)
    assert err.value.exit_code == 2
    assert str(err.value) == (
        f"entry script {tmp_path / 'score.py'}: no top-level run() "
        "(an entry script defines init() to load the model and run(data) to score a request)"
    )


def test_missing_model_file_and_unknown_profile(digits: Digits, registry: Any, tmp_path: Path) -> None:
    gone = ModelInput("digits", 7, [("model.onnx", tmp_path / "nowhere" / "model.onnx")])
    with pytest.raises(
        InputError, match=r"model digits:7: file model.onnx is missing \(expected at .*nowhere"
    ):
        package(
            PackageRequest([gone], InferenceConfig(), ["cpu"], registry=registry.address), progress=Recorder()
        )
    request = PackageRequest(digits.models("digits:1"), InferenceConfig(), ["gpu-of-the-future"])
    with pytest.raises(InputError, match="unknown device profile 'gpu-of-the-future'"):
        package(request, progress=Recorder())


def test_registry_down_is_a_clear_error(base: str, digits: Digits, docker_client: Any) -> None:
    down = f"127.0.0.1:{free_port()}"
    request = PackageRequest(
        digits.models("digits:1"), InferenceConfig(), ["cpu"], name="nowhere", registry=down
    )
    with pytest.raises(RegistryError) as err:
        package(request, client=docker_client, progress=Recorder())
    assert str(err.value) == (
        f"registry {down} is not reachable (connection refused) while checking the API: "
        "is it running? (start it or pass another --registry)"
    )


def test_registry_that_refuses_pushes_leaves_no_tags(
    base: str, digits: Digits, docker_client: Any, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    def start_read_only() -> RegistryServer:
        server = RegistryServer(tmp_path)
        config = server.config_path.read_text()
        server.config_path.write_text(
            config.replace("storage:\n", "storage:\n  maintenance:\n    readonly:\n      enabled: true\n")
        )
        server.start()
        return server

    read_only = start_or_skip(request.config, "registry", start_read_only)
    try:
        package_request = PackageRequest(
            digits.models("digits:1"), InferenceConfig(), ["cpu"], name="refused", registry=read_only.address
        )
        with pytest.raises(RegistryError) as err:
            package(package_request, client=docker_client, progress=Recorder())
        assert str(err.value).startswith(f"registry {read_only.address} refused ")
        assert "HTTP 405" in str(err.value)
        _no_tags_for(docker_client, read_only, "refused")
    finally:
        read_only.stop()


def test_full_disk_is_a_clear_error(digits: Digits, registry: Any, tmp_path: Path) -> None:
    small = tmp_path / "small-disk"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"CANNOT MOUNT A SMALL TMPFS TO FILL (needs root): {mounted.stderr.decode().strip()}")
    try:
        request = PackageRequest(
            digits.models("digits:2"), InferenceConfig(), ["cpu"], registry=registry.address
        )
        with pytest.raises(DiskFullError) as err:
            package(request, cache_dir=small, progress=Recorder())
        assert str(err.value).startswith(f"not enough free disk space for packaging in {small}: ")
    finally:
        subprocess.run(["umount", str(small)], check=False)


def test_vendor_profile_writes_a_context_but_cannot_build_here(
    digits: Digits, registry: Any, docker_client: Any, tmp_path: Path
) -> None:
    request = PackageRequest(
        digits.models("digits:1"), InferenceConfig(), ["openvino-myriad"], registry=registry.address
    )
    with pytest.raises(
        BaseImageUnavailable,
        match=re.escape("base-openvino-vpu:2022.3.1-ubuntu20-py310 is not available here"),
    ):
        package(request, client=docker_client, progress=Recorder())

    out = tmp_path / "myriad"
    context_request = PackageRequest(
        digits.models("digits:1"), InferenceConfig(), ["openvino-myriad"], dockerfile_dir=out
    )
    [result] = package(context_request, progress=Recorder())
    dockerfile = (out / "Dockerfile").read_text()
    assert "FROM localhost:5000/edgedeploy/base-openvino-vpu:2022.3.1-ubuntu20-py310" in dockerfile
    assert "COPY layers/1-python-deps/ /" in dockerfile
    deps = out / "layers" / "1-python-deps" / "module" / "lib"
    assert (deps / "numpy-1.24.4.dist-info").is_dir(), "the profile's pins, resolved for its Python 3.10"
    assert any(p.name.endswith("cpython-310-x86_64-linux-gnu.so") for p in deps.rglob("*.so"))
    assert {p.name for p in (out / "layers" / "2-runtime" / "module" / "profiles").iterdir()} == {
        "openvino-myriad.yaml",
        "cpu.yaml",
    }
    assert result.dockerfile == out / "Dockerfile"


def test_profile_reports_latency_and_resources(
    packaged_v1: PackagedImage, digits: Digits, docker_client: Any
) -> None:
    assert packaged_v1.ref is not None
    report = profile_image(
        packaged_v1.ref,
        json.dumps(digits.sample).encode(),
        requests=40,
        client=docker_client,
        progress=Recorder(),
    )
    assert report.errors == 0
    assert 0 < report.p50_ms <= report.p99_ms
    assert report.throughput_rps > 0
    assert report.memory_peak_mb > 10
    assert report.cpu_avg_cores > 0
    assert report.recommended_cpus >= 0.25
    assert report.recommended_memory_mb >= report.memory_peak_mb
    assert "resources:\n  cpus: " in report.manifest_snippet()
