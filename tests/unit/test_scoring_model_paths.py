"""get_model_path and model discovery over both MODEL_DIR layouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from modules.scoring.model_paths import ModelPathError, get_model_path, list_models, models_root_layout


def _tree(root: Path, *paths: str) -> None:
    for p in paths:
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_text("x")


def test_several_models_latest_version_by_number(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path, "digits/2/model.onnx", "digits/10/model.onnx", "iris/1/model.pkl")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    assert models_root_layout(tmp_path)
    assert get_model_path("digits") == str(tmp_path / "digits" / "10")
    assert get_model_path("digits", 2) == str(tmp_path / "digits" / "2")
    assert get_model_path("iris") == str(tmp_path / "iris" / "1")
    assert [(m.name, m.version) for m in list_models(tmp_path)] == [("digits", "10"), ("iris", "1")]


def test_missing_model_or_version_says_what_exists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _tree(tmp_path, "digits/1/model.onnx", "iris/1/model.pkl")
    monkeypatch.setenv("MODEL_DIR", str(tmp_path))
    with pytest.raises(ModelPathError, match=r"model 'wine' not found .*available: digits, iris"):
        get_model_path("wine")
    with pytest.raises(ModelPathError, match=r"no version 3 .*available: 1"):
        get_model_path("digits", 3)


def test_single_model_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "models" / "digits" / "3"
    _tree(folder, "model.onnx")
    monkeypatch.delenv("MODEL_DIR", raising=False)
    monkeypatch.setenv("AZUREML_MODEL_DIR", str(folder))
    assert not models_root_layout(folder)
    assert get_model_path("digits") == str(folder)
    assert get_model_path("digits", "3") == str(folder)
    with pytest.raises(ModelPathError, match="holds the single model digits version 3"):
        get_model_path("digits", 4)
    assert [(m.name, m.version) for m in list_models(folder)] == [("digits", "3")]


def test_unversioned_folder_is_version_1(tmp_path: Path) -> None:
    _tree(tmp_path / "mnist", "model.onnx")
    assert [(m.name, m.version) for m in list_models(tmp_path / "mnist")] == [("mnist", "1")]


def test_no_model_dir_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MODEL_DIR", raising=False)
    monkeypatch.delenv("AZUREML_MODEL_DIR", raising=False)
    with pytest.raises(ModelPathError, match="neither MODEL_DIR nor AZUREML_MODEL_DIR is set"):
        get_model_path("digits")
