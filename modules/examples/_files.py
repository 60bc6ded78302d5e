"""Small file helpers shared by the example builders."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from modules.contract import ModelRef, ModuleInfo


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (trailing newline) and return the path."""
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    return path


def write_module_info(out_dir: Path, info: ModuleInfo) -> Path:
    """Write ``module.json`` (the contract's ``ModuleInfo``) into ``out_dir``."""
    return write_json(out_dir / "module.json", info.model_dump(mode="json"))


def write_classifier_module(
    out_dir: Path, name: str, sample: dict[str, Any], label: int, probabilities: Sequence[float]
) -> None:
    """``sample.json``, ``expected.json`` and ``module.json`` of a no-code ONNX classifier whose
    ``model.onnx`` answers ``label`` and ``probabilities`` (the digits-style examples)."""
    write_json(out_dir / "sample.json", sample)
    write_json(out_dir / "expected.json", {"label": label})
    write_module_info(
        out_dir,
        ModuleInfo(
            name=name,
            version="1",
            profile="cpu",
            models=[ModelRef(name=name, version=1, files=["model.onnx"])],
            entry_script=None,
            input_sample=sample,
            output_sample={"label": [label], "probabilities": [[round(float(p), 6) for p in probabilities]]},
        ),
    )
