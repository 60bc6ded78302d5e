"""Small file helpers shared by the example builders."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modules.contract import ModuleInfo


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON (trailing newline) and return the path."""
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    return path


def write_module_info(out_dir: Path, info: ModuleInfo) -> Path:
    """Write ``module.json`` (the contract's ``ModuleInfo``) into ``out_dir``."""
    return write_json(out_dir / "module.json", info.model_dump(mode="json"))
