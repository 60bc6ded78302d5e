"""Device profiles: the shipped files, the loader's cross-file checks, and errors naming file and field."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from modules.contract import DeviceProfile
from modules.profiles import (
    PROFILES_DIR_ENV,
    REPO_PROFILES_DIR,
    ProfileError,
    default_profiles_dir,
    fallback_chain,
    get_profile,
    load_profile_file,
    load_profiles,
)

SHIPPED = {"cpu", "cuda", "tensorrt", "openvino-cpu", "openvino-myriad", "openvino-vadm", "npu", "fpga"}

GOOD = """\
name: {name}
description: a test profile
base:
  image: localhost:5000/edgedeploy/base-{name}:1
  source: debootstrap
  python_packages: [onnxruntime==1.31.1, numpy==2.4.6]
backend: onnxruntime
onnxruntime:
  providers:
    - name: CPUExecutionProvider
detect:
  always: true
"""


def write(folder: Path, name: str, text: str | None = None, *, suffix: str = ".yaml") -> Path:
    path = folder / f"{name}{suffix}"
    path.write_text(GOOD.format(name=name) if text is None else text)
    return path


def with_fallback(name: str, fallback: str) -> str:
    return GOOD.format(name=name) + f"fallback: {fallback}\n"


@pytest.fixture(scope="module")
def shipped() -> dict[str, DeviceProfile]:
    return load_profiles(REPO_PROFILES_DIR)


# --------------------------------------------------------------------------------------------
# The shipped profiles
# --------------------------------------------------------------------------------------------


def test_every_shipped_profile_loads(shipped: dict[str, DeviceProfile]) -> None:
    assert set(shipped) == SHIPPED
    for name in SHIPPED:
        assert load_profile_file(REPO_PROFILES_DIR / f"{name}.yaml") == shipped[name]
        assert shipped[name].support.strip(), f"{name}: say what current runtimes support"


@pytest.mark.parametrize(
    ("name", "chain"),
    [
        ("cpu", ["cpu"]),
        ("cuda", ["cuda", "cpu"]),
        ("tensorrt", ["tensorrt", "cuda", "cpu"]),
        ("openvino-cpu", ["openvino-cpu", "cpu"]),
        ("openvino-myriad", ["openvino-myriad", "cpu"]),
        ("openvino-vadm", ["openvino-vadm", "cpu"]),
        ("npu", ["npu", "cpu"]),
        ("fpga", ["fpga", "cpu"]),
    ],
)
def test_fallback_chains_end_on_cpu(shipped: dict[str, DeviceProfile], name: str, chain: list[str]) -> None:
    assert fallback_chain(name, shipped) == chain


def test_cpu_profile_needs_nothing(shipped: dict[str, DeviceProfile]) -> None:
    cpu = shipped["cpu"]
    assert cpu.base.source == "debootstrap"
    assert cpu.onnxruntime is not None
    assert [p.name for p in cpu.onnxruntime.providers] == ["CPUExecutionProvider"]
    assert cpu.strict is False
    assert cpu.detect.always is True
    assert cpu.fallback is None
    assert cpu.container.model_dump() == type(cpu.container)().model_dump()
    pinned = {re.split(r"[=\[]", p)[0].lower() for p in cpu.base.python_packages}
    assert {"onnxruntime", "numpy", "aiohttp", "pydantic", "pyyaml", "orjson"} <= pinned


def test_no_shipped_profile_is_privileged(shipped: dict[str, DeviceProfile]) -> None:
    assert [name for name, p in shipped.items() if p.container.privileged] == []


def test_gpu_profiles_request_gpus_and_detect_nvidia(shipped: dict[str, DeviceProfile]) -> None:
    for name in ("cuda", "tensorrt"):
        profile = shipped[name]
        assert profile.container.gpus is not None and profile.container.gpus.driver == "nvidia"
        assert [(r.kind, r.value) for r in profile.detect.any_of] == [("path", "/dev/nvidia[0-9]*")]
        assert profile.onnxruntime is not None and profile.onnxruntime.package == "onnxruntime-gpu"
    cuda = shipped["cuda"].onnxruntime
    assert cuda is not None
    assert [p.name for p in cuda.providers] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    trt = shipped["tensorrt"].onnxruntime
    assert trt is not None
    assert [p.name for p in trt.providers] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    options = trt.providers[0].options
    assert options["trt_engine_cache_enable"] is True
    cache = str(options["trt_engine_cache_path"])
    assert any(v.endswith(":" + cache) for v in shipped["tensorrt"].container.volumes), (
        "engine cache must persist"
    )


def test_myriad_profiles_use_openvino_2022_3_from_the_vendor(shipped: dict[str, DeviceProfile]) -> None:
    for name, device in (("openvino-myriad", "MYRIAD"), ("openvino-vadm", "HDDL")):
        profile = shipped[name]
        assert profile.base.source == "vendor"
        assert profile.openvino is not None
        assert profile.openvino.device == device
        assert profile.openvino.version == "openvino==2022.3.*"
        assert "2023.0" in profile.support
    myriad = shipped["openvino-myriad"]
    assert myriad.container.device_cgroup_rules == ["c 189:* rmw"]
    assert myriad.container.volumes == ["/dev/bus/usb:/dev/bus/usb"]
    assert [(r.kind, r.value) for r in myriad.detect.any_of] == [("usb_vendor", "03e7")]
    vadm = shipped["openvino-vadm"]
    assert vadm.container.devices == ["/dev/ion"]
    assert "/var/tmp:/var/tmp" in vadm.container.volumes
    assert {(r.kind, r.value) for r in vadm.detect.all_of} == {
        ("path", "/var/tmp/hddl_service.sock"),
        ("usb_vendor", "03e7"),
    }


def test_npu_and_fpga_profiles(shipped: dict[str, DeviceProfile]) -> None:
    npu = shipped["npu"]
    assert npu.openvino is not None and npu.openvino.device == "NPU"
    assert npu.container.devices == ["/dev/accel/accel0"]
    assert [(r.kind, r.value) for r in npu.detect.all_of] == [
        ("path", "/dev/accel/accel*"),
        ("pci_vendor", "8086"),
    ]
    fpga = shipped["fpga"]
    assert fpga.base.source == "vendor"
    assert fpga.onnxruntime is not None
    assert fpga.onnxruntime.providers[0].name == "VitisAIExecutionProvider"
    assert [(r.kind, r.value) for r in fpga.detect.any_of] == [("path", "/dev/xclmgmt*")]


@pytest.fixture(scope="module")
def affine_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """y = x @ W + 1 for x of shape [N, 3]: standard operators every runtime compiles."""
    w = helper.make_tensor("W", TensorProto.FLOAT, [3, 2], [1.0, -1.0, 0.5, 2.0, 0.0, 3.0])
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "one"], ["y"])],
        "affine",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [w, one],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path_factory.mktemp("model") / "affine.onnx"
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_settings_are_accepted_by_the_real_runtime(
    shipped: dict[str, DeviceProfile], affine_model: Path, name: str
) -> None:
    """Provider options / OpenVINO config of each profile, on the runtimes present on this machine."""
    from modules.scoring.backends.loader import load_backend

    profile = shipped[name]
    if profile.onnxruntime is not None:
        first = profile.onnxruntime.providers[0].name
        if first not in ort.get_available_providers():
            pytest.skip(
                f"{first} is not in this onnxruntime build ({', '.join(ort.get_available_providers())})"
            )
        expected = first
    else:
        assert profile.openvino is not None
        if importlib.util.find_spec("openvino") is None:
            pytest.skip("openvino is not installed")
        import openvino

        devices = openvino.Core().available_devices
        if profile.openvino.device not in devices:
            pytest.skip(
                f"OpenVINO device {profile.openvino.device} is not present here ({', '.join(devices)})"
            )
        expected = f"openvino:{profile.openvino.device}"
    backend = load_backend(affine_model, profile, model_name="affine", threads=1)
    assert backend.provider == expected
    x = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    w = np.array([[1.0, -1.0], [0.5, 2.0], [0.0, 3.0]], dtype=np.float32)
    (y,) = backend.infer({"x": x}).values()
    np.testing.assert_allclose(y, x @ w + 1.0, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Where profiles come from
# --------------------------------------------------------------------------------------------


def test_default_directory_is_the_checkout_without_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PROFILES_DIR_ENV, raising=False)
    if Path("/module/profiles").is_dir():
        pytest.skip("this machine has /module/profiles, which takes precedence over the checkout")
    assert default_profiles_dir() == REPO_PROFILES_DIR
    assert get_profile("tensorrt").fallback == "cuda"


def test_env_directory_takes_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "edge")
    monkeypatch.setenv(PROFILES_DIR_ENV, str(tmp_path))
    assert default_profiles_dir() == tmp_path
    assert set(load_profiles()) == {"edge"}
    assert get_profile("edge").name == "edge"


def test_env_directory_must_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PROFILES_DIR_ENV, str(tmp_path / "nope"))
    with pytest.raises(ProfileError, match=rf"^{PROFILES_DIR_ENV}=.*nope: not a directory$"):
        load_profiles()


def test_unknown_profile_lists_the_known_ones(tmp_path: Path) -> None:
    write(tmp_path, "cpu")
    write(tmp_path, "edge", with_fallback("edge", "cpu"))
    with pytest.raises(ProfileError) as exc:
        get_profile("gpu", tmp_path)
    assert str(exc.value) == f"unknown device profile 'gpu' (known in {tmp_path}: cpu, edge)"
    with pytest.raises(ProfileError, match=r"unknown device profile 'gpu' \(known: cpu, edge\)"):
        fallback_chain("gpu", load_profiles(tmp_path))


def test_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("not a profile")
    with pytest.raises(ProfileError, match=r"no device profiles"):
        load_profiles(tmp_path)


def test_json_profiles_load_too(tmp_path: Path) -> None:
    (tmp_path / "edge.json").write_text(
        '{"name": "edge", "description": "json", "base": {"image": "localhost:5000/b:1", '
        '"source": "vendor", "vendor_note": "from the vendor"}, "backend": "openvino", '
        '"openvino": {"device": "CPU", "version": "openvino>=2024.0"}, "detect": {"always": true}}'
    )
    assert load_profiles(tmp_path)["edge"].openvino is not None


# --------------------------------------------------------------------------------------------
# Invalid files: every error names the file and the field
# --------------------------------------------------------------------------------------------

BAD_FILES = [
    pytest.param("name: bad\nbase: [\n", r"bad\.yaml:3: .*expected the node content", id="broken-yaml"),
    pytest.param(
        GOOD.format(name="bad") + "gpu_count: 1\n",
        r"bad\.yaml: gpu_count: Extra inputs are not permitted",
        id="unknown-field",
    ),
    pytest.param(
        GOOD.format(name="bad").replace("backend: onnxruntime", "backend: openvino"),
        r"bad\.yaml: \(document\): backend 'openvino' needs an 'openvino' section",
        id="wrong-backend-section",
    ),
    pytest.param(
        GOOD.format(name="bad").replace("backend: onnxruntime", "backend: tensorflow"),
        r"bad\.yaml: backend: Input should be 'onnxruntime' or 'openvino'",
        id="unknown-backend",
    ),
    pytest.param(
        GOOD.format(name="bad") + "container:\n  privileged: true\n",
        r"bad\.yaml: container: privileged containers need a privileged_reason",
        id="privileged-without-reason",
    ),
    pytest.param(
        GOOD.format(name="bad") + "container:\n  devices: [accel/accel0]\n",
        r"bad\.yaml: container\.devices: device 'accel/accel0' must be a path under /dev/",
        id="bad-device-path",
    ),
    pytest.param(
        GOOD.format(name="bad") + "container:\n  device_cgroup_rules: ['c 189 rmw']\n",
        r"bad\.yaml: container\.device_cgroup_rules: 'c 189 rmw' is not a device cgroup rule",
        id="bad-cgroup-rule",
    ),
    pytest.param(
        GOOD.format(name="bad").replace("  - name: CPUExecutionProvider", "  - name: CPU"),
        r"bad\.yaml: onnxruntime\.providers\.0\.name: String should match pattern",
        id="bad-provider-name",
    ),
    pytest.param(
        GOOD.format(name="bad").replace("detect:\n  always: true\n", "detect: {}\n"),
        r"bad\.yaml: detect: give detection rules \(any_of / all_of\) or always: true",
        id="no-detection",
    ),
    pytest.param(
        GOOD.format(name="bad").replace("source: debootstrap", "source: vendor"),
        r"bad\.yaml: base: a vendor base image needs a vendor_note",
        id="vendor-without-note",
    ),
    pytest.param(
        GOOD.format(name="bad").replace("base-bad:1", "Base-Bad:1"),
        r"bad\.yaml: base\.image: 'localhost:5000/edgedeploy/Base-Bad:1' is not a valid image reference",
        id="bad-image-ref",
    ),
    pytest.param(
        with_fallback("bad", "bad"),
        r"bad\.yaml: \(document\): a profile cannot fall back to itself",
        id="self-fallback",
    ),
    pytest.param(
        GOOD.format(name="other"),
        r"bad\.yaml: name: 'other' does not match the file name 'bad\.yaml'",
        id="name-not-stem",
    ),
    pytest.param(
        GOOD.format(name="bad") + "strict: true\nstrict: false\n",
        r"bad\.yaml:14: duplicate key 'strict' in mapping \(first on line 13\)",
        id="duplicate-key",
    ),
    pytest.param(
        GOOD.format(name="bad").replace("numpy==2.4.6", "numpy>=2"),
        r"bad\.yaml: base\.python_packages\.1: 'numpy>=2' is not pinned",
        id="unpinned-package",
    ),
    pytest.param(
        GOOD.format(name="bad").replace("onnxruntime==1.31.1, ", ""),
        r"bad\.yaml: base\.python_packages: onnxruntime\.package 'onnxruntime' is not installed",
        id="backend-package-missing",
    ),
]


@pytest.mark.parametrize(("text", "pattern"), BAD_FILES)
def test_invalid_profile_file(tmp_path: Path, text: str, pattern: str) -> None:
    path = write(tmp_path, "bad", text)
    with pytest.raises(ProfileError) as exc:
        load_profile_file(path)
    assert any(re.match(re.escape(str(tmp_path)) + "/" + pattern, line) for line in exc.value.problems), str(
        exc.value
    )

    write(tmp_path, "cpu")
    with pytest.raises(ProfileError) as exc:
        load_profiles(tmp_path)
    assert any(re.match(re.escape(str(tmp_path)) + "/" + pattern, line) for line in exc.value.problems), str(
        exc.value
    )


def test_fallback_to_unknown_profile(tmp_path: Path) -> None:
    write(tmp_path, "cpu")
    path = write(tmp_path, "edge", with_fallback("edge", "gpu"))
    assert load_profile_file(path).fallback == "gpu"  # alone, the file is fine
    with pytest.raises(ProfileError) as exc:
        load_profiles(tmp_path)
    assert str(exc.value) == f"{path}: fallback: unknown profile 'gpu' (known: cpu, edge)"


def test_fallback_cycle_is_reported_once(tmp_path: Path) -> None:
    write(tmp_path, "cpu")
    a = write(tmp_path, "a", with_fallback("a", "b"))
    write(tmp_path, "b", with_fallback("b", "c"))
    write(tmp_path, "c", with_fallback("c", "a"))
    write(tmp_path, "d", with_fallback("d", "a"))
    with pytest.raises(ProfileError) as exc:
        load_profiles(tmp_path)
    assert exc.value.problems == (f"{a}: fallback: fallbacks form a cycle: a -> b -> c -> a",)


def test_fallback_chain_refuses_cycles_in_hand_made_dicts(shipped: dict[str, DeviceProfile]) -> None:
    looped = {
        "cuda": shipped["cuda"].model_copy(update={"fallback": "tensorrt"}),
        "tensorrt": shipped["tensorrt"],
    }
    with pytest.raises(ProfileError, match=r"cycle: cuda -> tensorrt -> cuda"):
        fallback_chain("cuda", looped)


def test_same_name_in_two_files(tmp_path: Path) -> None:
    write(tmp_path, "cpu")
    other = write(tmp_path, "cpu", suffix=".yml")
    with pytest.raises(
        ProfileError, match=rf"^{re.escape(str(other))}: name: profile 'cpu' is also defined in"
    ):
        load_profiles(tmp_path)


def test_all_problems_of_all_files_are_reported_together(tmp_path: Path) -> None:
    write(tmp_path, "cpu")
    write(tmp_path, "one", GOOD.format(name="one") + "extra: 1\n")
    write(tmp_path, "two", GOOD.format(name="zwei"))
    write(tmp_path, "three", with_fallback("three", "nowhere"))
    with pytest.raises(ProfileError) as exc:
        load_profiles(tmp_path)
    files = sorted(Path(line.split(":")[0]).name for line in exc.value.problems)
    assert files == ["one.yaml", "three.yaml", "two.yaml"]
