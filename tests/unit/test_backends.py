"""Inference backends on real onnxruntime and OpenVINO (CPU), with models generated in the test.

Models: scikit-learn on ``load_digits`` converted with skl2onnx (a LogisticRegression with
ai.onnx.ml operators, the same with its ZipMap output, an MLPRegressor of standard operators that
OpenVINO can compile) and a two-input graph built with ``onnx.helper``.
"""

from __future__ import annotations

import logging
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPRegressor

from modules.contract import (
    BaseImage,
    Detection,
    DeviceProfile,
    ExecutionProvider,
    OnnxRuntimeSettings,
    OpenVinoSettings,
)
from modules.scoring.backends import BackendError, InferenceError, TensorSpec, load_backend
from modules.scoring.backends.onnx import OnnxBackend, choose_providers
from modules.scoring.backends.openvino import OpenVinoBackend, missing_devices
from modules.scoring.tensors import feeds_from_payload, outputs_to_json

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TRT = "TensorrtExecutionProvider"
W = np.array([[1.0, -1.0], [0.5, 2.0], [0.0, 3.0]], dtype=np.float32)


def onnx_profile(name: str, providers: list[ExecutionProvider], *, strict: bool = False) -> DeviceProfile:
    return DeviceProfile(
        name=name,
        description="test profile",
        base=BaseImage(image="127.0.0.1:5000/base:1", source="debootstrap"),
        backend="onnxruntime",
        onnxruntime=OnnxRuntimeSettings(providers=providers),
        strict=strict,
        detect=Detection(always=True),
    )


def openvino_profile(name: str, device: str, *, strict: bool = False) -> DeviceProfile:
    return DeviceProfile(
        name=name,
        description="test profile",
        base=BaseImage(image="127.0.0.1:5000/base:1", source="debootstrap"),
        backend="openvino",
        openvino=OpenVinoSettings(device=device, version="openvino>=2024.0"),
        strict=strict,
        detect=Detection(always=True),
    )


CPU_PROFILE = onnx_profile("cpu", [ExecutionProvider(name=CPU)])
CUDA_PROFILE = onnx_profile(
    "cuda", [ExecutionProvider(name=CUDA, options={"device_id": 0}), ExecutionProvider(name=CPU)]
)
CUDA_STRICT = onnx_profile("cuda", [ExecutionProvider(name=CUDA, options={"device_id": 0})], strict=True)
OV_CPU = openvino_profile("openvino-cpu", "CPU")


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    return x.astype(np.float32), y


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, digits: tuple[np.ndarray, np.ndarray]) -> dict:
    """Paths of the generated models and the fitted scikit-learn estimators."""
    x, y = digits
    root = tmp_path_factory.mktemp("models")
    logistic = LogisticRegression(max_iter=300).fit(x[:800], y[:800])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a rough fit is enough to compare runtimes
        mlp = MLPRegressor(hidden_layer_sizes=(16,), max_iter=100, random_state=0).fit(x[:800], y[:800])
    paths = {
        "logistic": root / "logistic.onnx",
        "zipmap": root / "zipmap.onnx",
        "mlp": root / "mlp.onnx",
        "pair": root / "pair.onnx",
    }
    paths["logistic"].write_bytes(to_onnx(logistic, x[:1], options={"zipmap": False}).SerializeToString())
    paths["zipmap"].write_bytes(to_onnx(logistic, x[:1]).SerializeToString())
    paths["mlp"].write_bytes(to_onnx(mlp, x[:1]).SerializeToString())
    onnx.save(_pair_model(), paths["pair"])
    return {"paths": paths, "logistic": logistic, "mlp": mlp}


def _pair_model() -> onnx.ModelProto:
    """y = (a + b) @ W for a, b of shape [N, 3]."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["s"]), helper.make_node("MatMul", ["s", "w"], ["y"])],
        "pair",
        [
            helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        initializer=[numpy_helper.from_array(W, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# ------------------------------------------------------------------------------ provider choice


def test_providers_keep_profile_order_filtered_by_availability() -> None:
    profile = onnx_profile(
        "tensorrt",
        [
            ExecutionProvider(name=TRT, options={"trt_fp16_enable": True, "trt_max_workspace_size": 1 << 30}),
            ExecutionProvider(name=CUDA, options={"device_id": 0}),
            ExecutionProvider(name=CPU),
        ],
    )
    assert choose_providers(profile, [CPU, CUDA, TRT]) == [
        (TRT, {"trt_fp16_enable": "1", "trt_max_workspace_size": str(1 << 30)}),
        (CUDA, {"device_id": "0"}),
        (CPU, {}),
    ]
    assert choose_providers(profile, [CPU, CUDA]) == [(CUDA, {"device_id": "0"}), (CPU, {})]
    assert choose_providers(profile, [CPU]) == [(CPU, {})]


def test_non_strict_profiles_always_end_with_cpu() -> None:
    profile = onnx_profile("cuda-only", [ExecutionProvider(name=CUDA)])
    assert choose_providers(profile, [CUDA, CPU]) == [(CUDA, {}), (CPU, {})]
    assert choose_providers(profile, [CPU]) == [(CPU, {})]


def test_strict_profiles_get_no_cpu_fallback() -> None:
    assert choose_providers(CUDA_STRICT, [CUDA, CPU]) == [(CUDA, {"device_id": "0"})]


def test_strict_profile_with_missing_provider_fails_clearly(models: dict) -> None:
    expected = (
        "profile cuda is strict: CUDAExecutionProvider is not available in this onnxruntime build "
        "(available: AzureExecutionProvider, CPUExecutionProvider)"
    )
    with pytest.raises(BackendError) as err:
        choose_providers(CUDA_STRICT, ["AzureExecutionProvider", CPU])
    assert str(err.value) == expected
    with pytest.raises(BackendError, match="profile cuda is strict: CUDAExecutionProvider is not available"):
        load_backend(models["paths"]["logistic"], CUDA_STRICT, model_name="digits")


def test_non_strict_profile_falls_back_to_cpu_with_a_warning(
    models: dict, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="modules.scoring.backends.onnx"):
        backend = load_backend(
            models["paths"]["logistic"], CUDA_PROFILE, model_name="digits", available_providers=[CPU]
        )
    assert backend.provider == CPU
    assert "CUDAExecutionProvider is not available" in caplog.text
    assert "falling back to CPUExecutionProvider" in caplog.text


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this onnxruntime build has CUDA")
def test_provider_dropped_by_onnxruntime_is_detected(models: dict, caplog: pytest.LogCaptureFixture) -> None:
    # Claiming CUDA is available makes onnxruntime try it; this CPU build silently drops it,
    # just as a GPU build does when the CUDA libraries fail to load.
    path = models["paths"]["logistic"]
    with pytest.raises(
        BackendError, match="profile cuda is strict: onnxruntime did not enable CUDAExecutionProvider"
    ):
        load_backend(path, CUDA_STRICT, model_name="digits", available_providers=[CUDA, CPU])
    with caplog.at_level(logging.WARNING, logger="modules.scoring.backends.onnx"):
        backend = load_backend(path, CUDA_PROFILE, model_name="digits", available_providers=[CUDA, CPU])
    assert backend.provider == CPU
    assert "could not enable CUDAExecutionProvider" in caplog.text
    assert "falling back to CPUExecutionProvider" in caplog.text


# ------------------------------------------------------------------------------ onnxruntime


def test_onnxruntime_specs_and_predictions_match_scikit_learn(
    models: dict, digits: tuple[np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    x, _ = digits
    with caplog.at_level(logging.INFO, logger="modules.scoring.backends.onnx"):
        backend = load_backend(models["paths"]["logistic"], CPU_PROFILE, model_name="digits", threads=2)
    assert backend.platform == "onnxruntime"
    assert backend.provider == CPU
    assert backend.inputs == (TensorSpec("X", "FP32", (None, 64)),)
    assert backend.outputs == (
        TensorSpec("label", "INT64", (None,)),
        TensorSpec("probabilities", "FP32", (None, 10)),
    )
    assert (
        "model digits: onnxruntime" in caplog.text
        and "provider CPUExecutionProvider, 2 intra-op thread(s) per run" in caplog.text
    )
    out = backend.infer({"X": x[800:900]})
    np.testing.assert_array_equal(out["label"], models["logistic"].predict(x[800:900]))
    np.testing.assert_allclose(out["probabilities"], models["logistic"].predict_proba(x[800:900]), atol=1e-4)


def test_onnxruntime_threads_come_from_allowed_cpus(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCORING_THREADS", "3")
    backend = OnnxBackend(models["paths"]["logistic"], CPU_PROFILE, model_name="digits")
    assert backend.threads == 3
    options = backend._session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (3, 1)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_zipmap_output_is_left_out_with_advice(models: dict, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="modules.scoring.backends.onnx"):
        backend = load_backend(models["paths"]["zipmap"], CPU_PROFILE, model_name="digits")
    assert [o.name for o in backend.outputs] == ["output_label"]
    assert "seq(map(int64,tensor(float)))" in caplog.text and "zipmap" in caplog.text


def test_two_input_model_through_the_no_code_path(models: dict) -> None:
    backend = load_backend(models["paths"]["pair"], CPU_PROFILE, model_name="pair")
    assert backend.inputs == (TensorSpec("a", "FP32", (None, 3)), TensorSpec("b", "FP32", (None, 3)))
    a, b = [[1, 2, 3], [4, 5, 6]], [[0.5, 0.5, 0.5], [1, 1, 1]]
    feeds = feeds_from_payload({"inputs": {"a": a, "b": b}}, backend.inputs)
    answer = outputs_to_json(backend.infer(feeds), backend.outputs)
    expected = (np.array(a, dtype=np.float32) + np.array(b, dtype=np.float32)) @ W
    np.testing.assert_allclose(answer["result"], expected, rtol=1e-6)


def test_runtime_failure_is_an_inference_error(models: dict) -> None:
    backend = load_backend(models["paths"]["pair"], CPU_PROFILE, model_name="pair")
    with pytest.raises(InferenceError, match="model pair: onnxruntime failed"):
        backend.infer({"a": np.zeros((1, 3), dtype=np.float64), "b": np.zeros((1, 3), dtype=np.float32)})


def test_corrupt_model_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(BackendError, match=f"onnxruntime cannot load model broken from {bad}"):
        load_backend(bad, CPU_PROFILE, model_name="broken")


# ------------------------------------------------------------------------------ OpenVINO


def test_openvino_profile_can_opt_into_bf16(models: dict) -> None:
    assert OV_CPU.openvino is not None
    bf16 = OV_CPU.openvino.model_copy(update={"config": {"INFERENCE_PRECISION_HINT": "bf16"}})
    profile = OV_CPU.model_copy(update={"openvino": bf16})
    vino = load_backend(models["paths"]["mlp"], profile, model_name="mlp", threads=1)
    # The hint is honoured where the CPU has bf16 units, and OpenVINO says f32 where it has not.
    assert vino.precision in ("bf16", "f32")


def test_openvino_cpu_matches_onnxruntime(models: dict, digits: tuple[np.ndarray, np.ndarray]) -> None:
    x, _ = digits
    path = models["paths"]["mlp"]
    vino = load_backend(path, OV_CPU, model_name="mlp", threads=2)
    ref = load_backend(path, CPU_PROFILE, model_name="mlp")
    assert isinstance(vino, OpenVinoBackend)
    assert (vino.platform, vino.provider) == ("openvino", "openvino:CPU")
    # OpenVINO would compute in bf16 on CPUs that have it (AMD Zen 4, Sapphire Rapids) unless told.
    assert (vino.precision, ref.precision) == ("f32", "f32")
    assert vino.inputs == ref.inputs == (TensorSpec("X", "FP32", (None, 64)),)
    assert vino.outputs == ref.outputs
    got, want = vino.infer({"X": x[800:1000]}), ref.infer({"X": x[800:1000]})
    assert set(got) == set(want) == {ref.outputs[0].name}
    np.testing.assert_allclose(got[ref.outputs[0].name], want[ref.outputs[0].name], rtol=1e-4, atol=1e-4)


def test_openvino_two_inputs(models: dict) -> None:
    backend = load_backend(models["paths"]["pair"], OV_CPU, model_name="pair")
    assert [s.name for s in backend.inputs] == ["a", "b"] and backend.outputs == (
        TensorSpec("y", "FP32", (None, 2)),
    )
    a, b = np.ones((4, 3), dtype=np.float32), np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_allclose(backend.infer({"a": a, "b": b})["y"], (a + b) @ W, rtol=1e-6)


def test_openvino_infer_is_thread_safe(models: dict) -> None:
    backend = load_backend(models["paths"]["pair"], OV_CPU, model_name="pair")
    batches = [np.full((2, 3), float(i), dtype=np.float32) for i in range(40)]

    def run(a: np.ndarray) -> np.ndarray:
        return backend.infer({"a": a, "b": a})["y"]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, batches))
    for a, y in zip(batches, results, strict=True):
        np.testing.assert_allclose(y, (a + a) @ W, rtol=1e-6)


def test_openvino_threads_setting(models: dict) -> None:
    backend = OpenVinoBackend(models["paths"]["pair"], OV_CPU, model_name="pair", threads=1)
    assert backend.threads == 1
    assert backend._compiled.get_property("INFERENCE_NUM_THREADS") == 1


def test_openvino_strict_missing_device(models: dict) -> None:
    profile = openvino_profile("openvino-myriad", "MYRIAD", strict=True)
    with pytest.raises(BackendError) as err:
        OpenVinoBackend(models["paths"]["pair"], profile, model_name="pair", available_devices=["CPU"])
    assert (
        str(err.value)
        == "profile openvino-myriad is strict: OpenVINO device MYRIAD is not available (available: CPU)"
    )


def test_openvino_missing_device_falls_back_to_cpu(models: dict, caplog: pytest.LogCaptureFixture) -> None:
    profile = openvino_profile("openvino-npu", "NPU")
    with caplog.at_level(logging.WARNING, logger="modules.scoring.backends.openvino"):
        backend = load_backend(models["paths"]["pair"], profile, model_name="pair")
    assert backend.provider == "openvino:CPU"
    assert "OpenVINO device NPU is not available" in caplog.text and "falling back to CPU" in caplog.text


def test_openvino_unsupported_operators(models: dict) -> None:
    # LinearClassifier (ai.onnx.ml) has no OpenVINO conversion.
    with pytest.raises(BackendError, match="OpenVINO cannot compile model digits for CPU") as err:
        load_backend(models["paths"]["logistic"], OV_CPU, model_name="digits")
    assert "LinearClassifier" in str(err.value)


def test_openvino_not_installed(models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "openvino", None)  # makes `import openvino` raise ImportError
    with pytest.raises(
        BackendError,
        match=r"profile openvino-cpu needs the openvino package \(pip install 'openvino>=2024.0'\)",
    ):
        load_backend(models["paths"]["pair"], OV_CPU, model_name="pair")


@pytest.mark.parametrize(
    ("device", "available", "missing"),
    [
        ("CPU", ["CPU"], []),
        ("GPU", ["CPU", "GPU.0", "GPU.1"], []),
        ("GPU.1", ["CPU", "GPU.0"], ["GPU.1"]),
        ("HETERO:GPU,CPU", ["CPU"], ["GPU"]),
        ("MULTI:MYRIAD(4),CPU", ["CPU", "MYRIAD.1.2-ma2480"], []),
        ("AUTO", [], []),
        ("AUTO:NPU,CPU", ["CPU"], ["NPU"]),
    ],
)
def test_missing_devices(device: str, available: list[str], missing: list[str]) -> None:
    assert missing_devices(device, available) == missing


# ------------------------------------------------------------------------------ model files


def test_model_folder_with_one_onnx_file(models: dict, tmp_path: Path) -> None:
    folder = tmp_path / "digits" / "1"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "model.onnx").write_bytes(models["paths"]["pair"].read_bytes())
    (folder / "README.txt").write_text("notes")
    assert load_backend(folder, CPU_PROFILE, model_name="pair").inputs[0].name == "a"


def test_missing_model_path(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=f"model path {tmp_path / 'nope.onnx'} does not exist"):
        load_backend(tmp_path / "nope.onnx", CPU_PROFILE, model_name="m")


def test_folder_with_two_onnx_files(models: dict, tmp_path: Path) -> None:
    for name in ("a.onnx", "b.onnx"):
        (tmp_path / name).write_bytes(models["paths"]["pair"].read_bytes())
    with pytest.raises(BackendError) as err:
        load_backend(tmp_path, CPU_PROFILE, model_name="m")
    assert (
        str(err.value) == f"model folder {tmp_path} holds 2 .onnx files, expected exactly one: a.onnx, b.onnx"
    )


def test_folder_without_onnx_lists_what_it_holds(tmp_path: Path) -> None:
    (tmp_path / "model.pkl").write_bytes(b"x")
    with pytest.raises(BackendError, match=r"holds no \.onnx file \(found: model\.pkl\)"):
        load_backend(tmp_path, CPU_PROFILE, model_name="m")


def test_non_onnx_file(tmp_path: Path) -> None:
    (tmp_path / "model.pkl").write_bytes(b"x")
    with pytest.raises(BackendError, match=r"is not an ONNX file"):
        load_backend(tmp_path / "model.pkl", CPU_PROFILE, model_name="m")
