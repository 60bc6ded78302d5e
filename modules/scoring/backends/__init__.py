"""Inference backends: one ``InferenceBackend`` per model, chosen by the device profile.

The server only talks to this interface. ``infer`` is blocking and thread-safe; the server calls it
from its thread pool, never on the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

# Open Inference Protocol v2 datatypes ↔ numpy dtypes.
OIP_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
NUMPY_TO_OIP: dict[np.dtype, str] = {v: k for k, v in OIP_TO_NUMPY.items()}


def oip_datatype(dtype: np.dtype) -> str:
    """The OIP datatype of a numpy dtype; strings and bytes (``U``, ``S``, ``O``) are ``BYTES``.

    Raises ValueError for dtypes OIP cannot carry (complex, datetime, ...).
    """
    dtype = np.dtype(dtype)
    if dtype.kind in "USO":
        return "BYTES"
    try:
        return NUMPY_TO_OIP[dtype.newbyteorder("=")]
    except KeyError:
        raise ValueError(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: name, OIP datatype and shape (``None`` for a dynamic dimension)."""

    name: str
    datatype: str
    shape: tuple[int | None, ...]

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of this tensor."""
        return OIP_TO_NUMPY[self.datatype]

    def shape_text(self) -> str:
        """The shape as users read it, e.g. ``[-1, 64]`` (-1: any size)."""
        return "[" + ", ".join("-1" if d is None else str(d) for d in self.shape) + "]"


class BackendError(RuntimeError):
    """The model cannot be served as configured (missing file, strict provider unavailable, ...)."""


class InferenceError(RuntimeError):
    """The runtime failed while running the model on feeds that passed validation."""


class InferenceBackend(Protocol):
    """A loaded model, ready to run."""

    model_name: str
    platform: str
    """``onnxruntime`` or ``openvino``."""
    provider: str
    """What actually runs the model, e.g. ``CUDAExecutionProvider`` or ``openvino:CPU``."""
    precision: str
    """The numeric precision it computes in: ``f32``, ``bf16``, ``f16``, ``int8``..."""
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on validated feeds (one array per input name); blocking, thread-safe."""
        ...


# Imported last: the loader needs the names above.
from modules.scoring.backends.loader import find_model_file, load_backend  # noqa: E402

__all__ = [
    "NUMPY_TO_OIP",
    "OIP_TO_NUMPY",
    "BackendError",
    "InferenceBackend",
    "InferenceError",
    "TensorSpec",
    "find_model_file",
    "load_backend",
    "oip_datatype",
]
