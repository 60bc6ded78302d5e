"""What goes into a module image, layer by layer, and the Dockerfile build context that says the same.

``make_plan`` decides the image: the base, then one layer each for Python deps, the scoring
runtime, the entry script with its sources, and the models with ``module.json`` (last, so a
model-only update changes only that layer), plus the environment, labels and command. The plan is
used twice: ``write_context`` writes it as a folder that plain ``docker build`` turns into the
image, and ``assemble.py`` builds the same layers reproducibly without a Dockerfile.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import modules
from cloud.inference_config import InferenceConfig
from cloud.packaging.errors import InputError, os_error
from cloud.packaging.image import RuntimeSettings
from cloud.packaging.layers import expand_entries
from modules.contract import DeviceProfile, ModelRef, ModuleInfo

PACKAGER_VERSION = "1"
MODULE_ROOT = "/module"
RUNTIME_ROOT = "/module/runtime"
LIB_ROOT = "/module/lib"
SRC_ROOT = "/module/src"
MODELS_ROOT = "/module/models"
PROFILES_ROOT = "/module/profiles"
SCORING_PORT = 5001
CMD = ("python3", "-m", "modules.scoring")
MANAGED_ENV = frozenset({"ENTRY_SCRIPT", "PROFILE", "PROFILES_DIR", "PYTHONPATH", "MODULE_JSON"})
_RUNTIME_SKIP_DIRS = frozenset({"examples", "__pycache__"})


@dataclass(frozen=True)
class ModelInput:
    """A registered model version to put in the image: files as ``(relative path, source file)``."""

    name: str
    version: int
    files: list[tuple[str, Path]]
    framework: str = "onnx"

    @property
    def label(self) -> str:
        """``name:version``."""
        return f"{self.name}:{self.version}"


@dataclass(frozen=True)
class LayerSpec:
    """One image layer: files (or folders) to place at paths inside the image."""

    name: str
    entries: list[tuple[str, Path]]
    created_by: str


@dataclass(frozen=True)
class ModulePlan:
    """Everything that defines one module image for one profile."""

    module: ModuleInfo
    profile: DeviceProfile
    base_from: str
    layers: list[LayerSpec]
    settings: RuntimeSettings
    python_path: str
    """PYTHONPATH without the base's own (``$PYTHONPATH`` is appended to it)."""
    notes: list[str] = field(default_factory=list)


def runtime_entries() -> list[tuple[str, Path]]:
    """The scoring runtime: the ``modules`` package's files (no examples, no caches)."""
    root = Path(modules.__file__).resolve().parent
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _RUNTIME_SKIP_DIRS)
        rel_dir = Path(dirpath).relative_to(root)
        for name in sorted(filenames):
            if name.endswith((".pyc", ".pyo")):
                continue
            rel = PurePosixPath(*rel_dir.parts, name)
            entries.append((f"{RUNTIME_ROOT}/modules/{rel}", Path(dirpath) / name))
    return entries


def model_dir(models: Sequence[ModelInput]) -> str:
    """MODEL_DIR: the single model's folder, or the models root for several."""
    if len(models) == 1:
        return f"{MODELS_ROOT}/{models[0].name}/{models[0].version}"
    return MODELS_ROOT


def module_info(
    name: str,
    version: str,
    profile: str,
    models: Sequence[ModelInput],
    config: InferenceConfig,
) -> ModuleInfo:
    """The ``/module/module.json`` of the image."""
    input_sample, output_sample = config.samples()
    return ModuleInfo(
        name=name,
        version=version,
        profile=profile,
        models=[
            ModelRef(name=m.name, version=m.version, files=sorted(rel for rel, _ in m.files)) for m in models
        ],
        entry_script=config.entry_script,
        input_sample=input_sample,
        output_sample=output_sample,
    )


def make_plan(
    info: ModuleInfo,
    profile: DeviceProfile,
    models: Sequence[ModelInput],
    config: InferenceConfig,
    *,
    base_from: str,
    profile_files: Sequence[Path],
    python_deps: Path | None,
    scratch: Path,
) -> ModulePlan:
    """Decide the image's layers and settings; generated files (module.json) go into ``scratch``."""
    clash = sorted(MANAGED_ENV & set(config.env))
    if clash:
        raise InputError(
            f"inference config env: {', '.join(clash)} is set by the packager and cannot be overridden"
        )
    scratch.mkdir(parents=True, exist_ok=True)
    module_json = scratch / "module.json"
    module_json.write_text(json.dumps(info.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")

    layers: list[LayerSpec] = []
    if python_deps is not None and any(python_deps.iterdir()):
        layers.append(LayerSpec("python-deps", [(LIB_ROOT, python_deps)], f"COPY python deps {LIB_ROOT}"))
    runtime = runtime_entries() + [(f"{PROFILES_ROOT}/{p.name}", p) for p in profile_files]
    layers.append(
        LayerSpec("runtime", runtime, f"COPY scoring runtime {RUNTIME_ROOT}, profiles {PROFILES_ROOT}")
    )
    sources = [(f"{SRC_ROOT}/{rel}", config.path(rel)) for rel in config.source_files]
    if config.entry_script:
        sources.append((f"{SRC_ROOT}/{config.entry_script}", config.path(config.entry_script)))
    if sources:
        layers.append(LayerSpec("src", sources, f"COPY entry script and sources {SRC_ROOT}"))
    model_entries = [
        (f"{MODELS_ROOT}/{m.name}/{m.version}/{rel}", src) for m in models for rel, src in sorted(m.files)
    ]
    model_entries.append((f"{MODULE_ROOT}/module.json", module_json))
    layers.append(LayerSpec("models", model_entries, f"COPY models {', '.join(m.label for m in models)}"))

    python_path = RUNTIME_ROOT + (f":{LIB_ROOT}" if layers[0].name == "python-deps" else "")
    env = {
        **config.image_env(),
        "MODEL_DIR": model_dir(models),
        "AZUREML_MODEL_DIR": model_dir(models),
        "PROFILE": profile.name,
        "PROFILES_DIR": PROFILES_ROOT,
        "PYTHONUNBUFFERED": "1",
    }
    if config.entry_script:
        env["ENTRY_SCRIPT"] = f"{SRC_ROOT}/{config.entry_script}"
    labels = {
        "org.opencontainers.image.title": info.name,
        "org.opencontainers.image.version": info.version,
        "org.opencontainers.image.base.name": base_from,
        "io.edgedeploy.module": info.name,
        "io.edgedeploy.profile": profile.name,
        "io.edgedeploy.models": ",".join(m.label for m in models),
        "io.edgedeploy.packager": PACKAGER_VERSION,
    }
    settings = RuntimeSettings(
        env=env, cmd=CMD, workdir=MODULE_ROOT, exposed_ports=(f"{SCORING_PORT}/tcp",), labels=labels
    )
    notes = [profile.base.vendor_note] if profile.base.source == "vendor" and profile.base.vendor_note else []
    return ModulePlan(info, profile, base_from, layers, settings, python_path, notes)


def python_path_over(plan: ModulePlan, base_env: Sequence[str]) -> str:
    """The PYTHONPATH the image ends up with: the plan's, then the base image's own."""
    inherited = next((item.split("=", 1)[1] for item in base_env if item.startswith("PYTHONPATH=")), "")
    return plan.python_path + (f":{inherited}" if inherited else "")


# ------------------------------------------------------------------------------------------ Dockerfile


def _quote(value: str) -> str:
    """A Dockerfile ENV/LABEL value: double-quoted, with ``\\``, ``"`` and ``$`` escaped."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$") + '"'


def layer_dir(index: int, layer: LayerSpec) -> str:
    """The context folder of a layer: ``layers/2-runtime``."""
    return f"layers/{index}-{layer.name}"


def render_dockerfile(plan: ModulePlan) -> str:
    """The Dockerfile of a plan (COPY per layer, then ENV, LABEL, WORKDIR, EXPOSE, CMD)."""
    lines = [
        f"# Generated by edgedeploy (packager {PACKAGER_VERSION}): module {plan.module.name} "
        f"{plan.module.version}, profile {plan.profile.name}.",
        "# Build with plain `docker build .` in this folder. Layers go from least to most often changed:",
        "# base, python deps, scoring runtime, entry script and sources, models (last, so a model-only",
        "# update rebuilds and pushes only that layer).",
    ]
    for note in plan.notes:
        lines.append("#")
        lines += [f"# {line}" for line in textwrap.wrap(f"Base image: {note}", 96)]
    lines.append(f"FROM {plan.base_from}")
    for i, layer in enumerate(plan.layers, 1):
        lines.append(f"COPY {layer_dir(i, layer)}/ /")
    env_items = [f"{k}={_quote(v)}" for k, v in plan.settings.env.items()]
    env_items.append(f'PYTHONPATH="{plan.python_path}${{PYTHONPATH:+:$PYTHONPATH}}"')
    lines.append("ENV " + " \\\n    ".join(env_items))
    lines.append("LABEL " + " \\\n      ".join(f"{k}={_quote(v)}" for k, v in plan.settings.labels.items()))
    lines.append(f"WORKDIR {plan.settings.workdir}")
    lines.append(f"EXPOSE {SCORING_PORT}")
    lines.append("CMD " + json.dumps(list(plan.settings.cmd)))
    return "\n".join(lines) + "\n"


def write_context(plan: ModulePlan, out_dir: Path, epoch: int) -> Path:
    """Write the plan as a ``docker build`` context in ``out_dir`` (emptied first), every mtime ``epoch``."""
    try:
        if out_dir.exists():
            if not out_dir.is_dir():
                raise InputError(f"--dockerfile {out_dir}: exists and is not a folder")
            for item in out_dir.iterdir():
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item)
                else:
                    item.unlink()
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, layer in enumerate(plan.layers, 1):
            root = out_dir / layer_dir(i, layer)
            for dest, src in sorted(expand_entries(layer.entries).items()):
                target = root.joinpath(*dest.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                if src.is_symlink():
                    os.symlink(os.readlink(src), target)
                else:
                    shutil.copyfile(src, target)
                    os.chmod(target, 0o755 if os.stat(src).st_mode & 0o111 else 0o644)
        (out_dir / "Dockerfile").write_text(render_dockerfile(plan))
        for dirpath, dirnames, filenames in os.walk(out_dir, topdown=False):
            for name in filenames + dirnames:
                os.utime(Path(dirpath) / name, (epoch, epoch), follow_symlinks=False)
        os.utime(out_dir, (epoch, epoch))
    except OSError as exc:
        raise os_error(exc, f"writing the build context {out_dir}") from None
    return out_dir / "Dockerfile"
