"""The example modules build from bundled data and their models answer their own samples."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="the examples need scikit-learn (dev extra)")
pytest.importorskip("skl2onnx", reason="the digits example needs skl2onnx (dev extra)")

from modules.contract import ModuleInfo
from modules.examples.__main__ import main


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("examples")
    assert main(["build", str(out)]) == 0
    return out


def _load_script(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_writes_the_module_folders(examples: Path) -> None:
    assert sorted(p.name for p in (examples / "digits").iterdir()) == [
        "expected.json",
        "model.onnx",
        "module.json",
        "sample.json",
    ]
    assert {"model.pkl", "score.py", "score_schema.py", "module.json"} <= {
        p.name for p in (examples / "diabetes").iterdir()
    }
    digits = ModuleInfo.model_validate_json((examples / "digits" / "module.json").read_text())
    assert digits.entry_script is None
    assert digits.models[0].files == ["model.onnx"]
    diabetes = ModuleInfo.model_validate_json((examples / "diabetes" / "module.json").read_text())
    assert diabetes.entry_script == "score.py"


def test_json_output_lists_the_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["build", str(tmp_path), "--only", "diabetes", "--json"]) == 0
    written = json.loads(capsys.readouterr().out)
    assert list(written) == ["diabetes"]
    assert Path(str(written["diabetes"]["model"])).is_file()
    assert "score.py" in written["diabetes"]["files"]


def test_digits_onnx_predicts_the_sample_label(examples: Path) -> None:
    import onnxruntime as ort

    folder = examples / "digits"
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    [inp] = session.get_inputs()
    assert (inp.name, inp.shape, inp.type) == ("float_input", [None, 64], "tensor(float)")
    assert [o.name for o in session.get_outputs()] == ["label", "probabilities"]

    data = np.array(json.loads((folder / "sample.json").read_text())["data"], dtype=np.float32)
    assert data.shape == (1, 64)
    label, proba = session.run(None, {"float_input": data})
    expected = json.loads((folder / "expected.json").read_text())["label"]
    assert label.tolist() == [expected]
    assert proba.shape == (1, 10)
    assert int(np.argmax(proba[0])) == expected


def test_diabetes_entry_script_runs_in_process(examples: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = examples / "diabetes"
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(folder))
    script = _load_script(folder / "score.py", "diabetes_score_under_test")
    script.init()
    raw = (folder / "sample.json").read_text()
    result = script.run(raw)
    expected = json.loads((folder / "expected.json").read_text())["prediction"]
    assert isinstance(result, list)
    assert result == pytest.approx([expected])

    two_rows = json.dumps({"data": json.loads(raw)["data"] * 2})
    assert script.run(two_rows) == pytest.approx([expected, expected])

    with pytest.raises(ValueError, match="data"):
        script.run(json.dumps({"rows": []}))


def test_diabetes_schema_script_parses_through_its_decorators(
    examples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("inference_schema", reason="score_schema.py needs inference-schema (dev extra)")
    folder = examples / "diabetes"
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(folder))
    script = _load_script(folder / "score_schema.py", "diabetes_score_schema_under_test")
    script.init()
    body = json.loads((folder / "sample.json").read_text())
    expected = json.loads((folder / "expected.json").read_text())["prediction"]
    assert script.run(**body) == pytest.approx([expected])

    with pytest.raises(ValueError, match="dimension #1"):
        script.run(data=[[0.1, 0.2, 0.3]])


def test_entry_script_without_model_dir_says_what_is_missing(
    examples: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AZUREML_MODEL_DIR", raising=False)
    script = _load_script(examples / "diabetes" / "score.py", "diabetes_score_no_dir")
    with pytest.raises(RuntimeError, match="AZUREML_MODEL_DIR"):
        script.init()


def test_unknown_image_size_is_rejected(tmp_path: Path) -> None:
    from modules.examples.digits import build_digits_onnx

    with pytest.raises(ValueError, match="image_size"):
        build_digits_onnx(tmp_path, image_size=16)


def test_convnet_is_inference_bound_and_classifies_digits(examples: Path) -> None:
    import onnxruntime as ort

    from modules.examples.convnet import dataset

    folder = examples / "convnet"
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    [inp] = session.get_inputs()
    assert (inp.name, inp.shape) == ("image", ["batch", 1, 28, 28]), "a dynamic batch dimension"
    data = np.array(json.loads((folder / "sample.json").read_text())["data"], dtype=np.float32)
    label, proba = session.run(None, {"image": data})
    assert label.tolist() == [json.loads((folder / "expected.json").read_text())["label"]]
    assert proba.shape == (1, 10)
    x, y = dataset()
    predicted = session.run(["label"], {"image": x})[0]
    assert (predicted == y).mean() > 0.9, "random conv features + a fitted softmax still classify digits"
