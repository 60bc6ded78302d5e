"""Find a model's ONNX file and load it with the backend its device profile names."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from modules.scoring.backends import BackendError, InferenceBackend

if TYPE_CHECKING:
    from modules.contract import DeviceProfile


def find_model_file(model_path: Path) -> Path:
    """``model_path`` itself when it is a ``.onnx`` file, else the one ``.onnx`` file under the folder.

    Raises BackendError naming the path when it is missing, not ONNX, or holds zero or several
    ``.onnx`` files (listing them).
    """
    path = Path(model_path)
    if not path.exists():
        raise BackendError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix.lower() != ".onnx":
            raise BackendError(f"model file {path} is not an ONNX file (expected a .onnx suffix)")
        return path
    found = sorted(p for p in path.rglob("*") if p.suffix.lower() == ".onnx" and p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        names = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        listing = ", ".join(names[:20]) or "nothing"
        if len(names) > 20:
            listing += f" and {len(names) - 20} more"
        raise BackendError(f"model folder {path} holds no .onnx file (found: {listing})")
    listing = ", ".join(str(p.relative_to(path)) for p in found)
    raise BackendError(f"model folder {path} holds {len(found)} .onnx files, expected exactly one: {listing}")


def load_backend(
    model_path: Path,
    profile: DeviceProfile,
    *,
    model_name: str,
    available_providers: Sequence[str] | None = None,
    threads: int | None = None,
    concurrent: int = 1,
) -> InferenceBackend:
    """Load the model at ``model_path`` (a ``.onnx`` file or a folder with exactly one) for ``profile``.

    ``profile.backend`` picks onnxruntime or OpenVINO. ``available_providers`` replaces
    ``onnxruntime.get_available_providers()`` (tests); ``threads`` replaces ``allowed_cpus()``;
    ``concurrent`` is how many ``infer`` calls may run at once (they share the threads).
    Blocking (reads and compiles the model). Raises BackendError with the reason.
    """
    model_file = find_model_file(model_path)
    if profile.backend == "onnxruntime":
        from modules.scoring.backends.onnx import OnnxBackend

        return OnnxBackend(
            model_file,
            profile,
            model_name=model_name,
            available_providers=available_providers,
            threads=threads,
            concurrent=concurrent,
        )
    if profile.backend == "openvino":
        from modules.scoring.backends.openvino import OpenVinoBackend

        return OpenVinoBackend(
            model_file, profile, model_name=model_name, threads=threads, concurrent=concurrent
        )
    raise BackendError(f"profile {profile.name}: unknown backend {profile.backend!r}")
