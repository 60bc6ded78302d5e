"""OpenVINO backend: compiles the ONNX file for the profile's device (CPU, GPU, NPU, MYRIAD, AUTO...).

``openvino`` is optional (the ``openvino`` extra) and imported only when a profile asks for it.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from modules.scoring.backends import BackendError, InferenceError, TensorSpec, oip_datatype
from modules.scoring.cpus import allowed_cpus

if TYPE_CHECKING:
    from modules.contract import DeviceProfile

log = logging.getLogger(__name__)

# What OpenVINO computes in unless the profile's config sets INFERENCE_PRECISION_HINT.
DEFAULT_PRECISION = "f32"

# Virtual devices that pick or combine real ones; their targets follow the colon.
_VIRTUAL_DEVICES = ("AUTO", "MULTI", "HETERO", "BATCH")


def missing_devices(device: str, available: Sequence[str]) -> list[str]:
    """The real devices ``device`` names that are not in ``available`` (``GPU`` matches ``GPU.0``).

    ``AUTO`` without a list picks whatever exists, so it never misses anything.
    """
    kind, _, targets = device.partition(":")
    names = (
        [t.split("(")[0].strip() for t in targets.split(",") if t.strip()]
        if kind in _VIRTUAL_DEVICES
        else [device]
    )
    return [n for n in names if not any(a == n or a.startswith(n + ".") for a in available)]


class OpenVinoBackend:
    """A model compiled by OpenVINO; ``infer`` is thread-safe (one infer request per thread)."""

    platform = "openvino"

    def __init__(
        self,
        model_path: Path,
        profile: DeviceProfile,
        *,
        model_name: str,
        threads: int | None = None,
        concurrent: int = 1,
        available_devices: Sequence[str] | None = None,
    ) -> None:
        if profile.openvino is None:
            raise BackendError(f"profile {profile.name} has no 'openvino' section")
        settings = profile.openvino
        try:
            ov = importlib.import_module("openvino")
        except ImportError:
            raise BackendError(
                f"profile {profile.name} needs the openvino package (pip install '{settings.version}')"
            ) from None
        self.model_name = model_name
        core = ov.Core()
        available = list(core.available_devices if available_devices is None else available_devices)
        device = settings.device
        missing = missing_devices(device, available)
        if missing:
            found = ", ".join(available) or "none"
            msg = f"OpenVINO device {', '.join(missing)} is not available (available: {found})"
            if profile.strict:
                raise BackendError(f"profile {profile.name} is strict: {msg}")
            log.warning("model %s: %s; falling back to CPU", model_name, msg)
            device = "CPU"
        self.threads = allowed_cpus() if threads is None else threads
        self.concurrent = max(1, concurrent)
        config: dict[str, Any] = dict(settings.config) if device == settings.device else {}
        supported = _supported_properties(core, device)
        if "INFERENCE_NUM_THREADS" in supported:
            config.setdefault("INFERENCE_NUM_THREADS", self.threads)
        if "PERFORMANCE_HINT" in supported:
            # One call at a time (batches) gets every thread; several share them as streams.
            config.setdefault("PERFORMANCE_HINT", "LATENCY" if self.concurrent == 1 else "THROUGHPUT")
        if "NUM_STREAMS" in supported and self.concurrent > 1:
            config.setdefault("NUM_STREAMS", min(self.concurrent, self.threads))
        if "INFERENCE_PRECISION_HINT" in supported:
            # CPUs with bf16/fp16 units make OpenVINO compute in them by default, which changes
            # results by ~1e-2; a served model answers as exported unless the profile opts in.
            config.setdefault("INFERENCE_PRECISION_HINT", DEFAULT_PRECISION)
        try:
            model = core.read_model(str(model_path))
            # Names and shapes come from the model as read: compiling merges tensor names.
            self.inputs = tuple(_tensor_spec(p, model_name) for p in model.inputs)
            self.outputs = tuple(_tensor_spec(p, model_name) for p in model.outputs)
            self._compiled = core.compile_model(model, device, config)
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(
                f"OpenVINO cannot compile model {model_name} for {device} from {model_path}: {e}"
            ) from e
        self.provider = f"openvino:{device}"
        self.precision = _compiled_precision(self._compiled, config)
        self._local = threading.local()
        log.info(
            "model %s: openvino %s, provider %s, precision %s, %d threads, %s (%s)",
            model_name,
            ov.__version__,
            self.provider,
            self.precision,
            self.threads,
            config.get("PERFORMANCE_HINT", "no performance hint"),
            model_path,
        )

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on this thread's infer request; raises InferenceError when OpenVINO fails."""
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        try:
            by_index = {i: feeds[spec.name] for i, spec in enumerate(self.inputs)}
            # share_outputs=False (the default) copies results out of the request's reused buffers.
            results = request.infer(by_index, share_outputs=False).to_tuple()
        except Exception as e:
            raise InferenceError(f"model {self.model_name}: OpenVINO failed: {e}") from e
        return {spec.name: np.asarray(r) for spec, r in zip(self.outputs, results, strict=True)}


def _supported_properties(core: Any, device: str) -> Any:
    try:
        return core.get_property(device.split(":")[0], "SUPPORTED_PROPERTIES")
    except Exception:
        return {}


def _compiled_precision(compiled: Any, config: dict[str, Any]) -> str:
    """The precision the compiled model computes in (``f32``, ``bf16``, ``f16``...)."""
    try:
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        return str(hint.get_type_name() if hasattr(hint, "get_type_name") else hint).lower()
    except Exception:
        return str(config.get("INFERENCE_PRECISION_HINT", "default")).lower()


def _tensor_spec(port: Any, model_name: str) -> TensorSpec:
    """A TensorSpec from an OpenVINO port (dynamic dimensions → None)."""
    name = port.get_any_name()
    partial = port.get_partial_shape()
    if partial.rank.is_dynamic:
        raise BackendError(f"model {model_name}: tensor {name!r} has a dynamic rank, which cannot be served")
    try:
        datatype = oip_datatype(port.get_element_type().to_dtype())
    except Exception as e:
        raise BackendError(f"model {model_name}: tensor {name!r} has an unsupported type: {e}") from None
    shape = tuple(None if d.is_dynamic else d.get_length() for d in partial)
    return TensorSpec(name=name, datatype=datatype, shape=shape)
