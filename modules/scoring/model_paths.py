"""Where a module's models are: ``get_model_path`` for entry scripts, model discovery for no-code mode.

Two layouts, as in Azure ML: ``MODEL_DIR`` (and ``AZUREML_MODEL_DIR``) is the single model's folder
(``.../<name>/<version>/``), or the models root holding ``<name>/<version>/`` for several models.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

MODEL_DIR_VARS = ("MODEL_DIR", "AZUREML_MODEL_DIR")


class ModelPathError(LookupError):
    """A model asked for is not in the module."""


@dataclass(frozen=True)
class ModelLocation:
    """One model version found on disk."""

    name: str
    version: str
    path: Path


def _versions(model_folder: Path) -> list[str]:
    """Version sub-folders of a model, oldest first (numeric versions sort numerically)."""
    found = [p.name for p in model_folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return sorted(found, key=lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v))


def models_root_layout(root: Path) -> bool:
    """True when ``root`` holds ``<name>/<version>/`` folders rather than one model's files."""
    if not root.is_dir() or any(p.is_file() and not p.name.startswith(".") for p in root.iterdir()):
        return False
    subdirs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    return bool(subdirs) and all(_versions(d) for d in subdirs)


def resolve_model(root: Path, name: str, version: int | str | None = None) -> ModelLocation:
    """Find model ``name`` (latest version when ``version`` is None) under ``root`` in either layout."""
    wanted = None if version is None else str(version)
    if models_root_layout(root):
        folder = root / name
        if not folder.is_dir():
            available = ", ".join(sorted(p.name for p in root.iterdir() if p.is_dir())) or "none"
            raise ModelPathError(f"model {name!r} not found in {root} (available: {available})")
        versions = _versions(folder)
        chosen = versions[-1] if wanted is None else wanted
        if chosen not in versions:
            raise ModelPathError(
                f"model {name!r} has no version {wanted} in {folder} (available: {', '.join(versions)})"
            )
        return ModelLocation(name, chosen, folder / chosen)
    single = _single_model(root)
    if single.name == name and (wanted is None or single.version == wanted):
        return single
    asked = name if wanted is None else f"{name} version {wanted}"
    raise ModelPathError(
        f"model {asked} not found: {root} holds the single model {single.name} version {single.version}"
    )


def _single_model(folder: Path) -> ModelLocation:
    """Name and version of a single model's folder: ``<name>/<version>/``, or ``<name>/`` as version 1."""
    if folder.name.isdigit() and folder.parent.name:
        return ModelLocation(folder.parent.name, folder.name, folder)
    return ModelLocation(folder.name, "1", folder)


def list_models(root: Path) -> list[ModelLocation]:
    """Every model in the module, latest version of each, in name order."""
    if models_root_layout(root):
        return [resolve_model(root, d.name) for d in sorted(root.iterdir()) if d.is_dir() and _versions(d)]
    return [_single_model(root)]


def model_root_from_env() -> Path:
    """The folder named by ``MODEL_DIR`` (or ``AZUREML_MODEL_DIR``); raises when neither is set."""
    for var in MODEL_DIR_VARS:
        value = os.environ.get(var)
        if value:
            return Path(value)
    raise ModelPathError("no model folder: neither MODEL_DIR nor AZUREML_MODEL_DIR is set")


def get_model_path(name: str, version: int | str | None = None) -> str:
    """The folder of model ``name`` (latest version when ``version`` is None), for entry scripts.

    Works for one model (``MODEL_DIR`` is its folder) and for several (``MODEL_DIR`` is the root
    holding ``<name>/<version>/``). Returns a str, like Azure ML's ``Model.get_model_path``.
    Raises ``ModelPathError`` naming what is available when the model or version is missing.
    """
    return str(resolve_model(model_root_from_env(), name, version).path)
