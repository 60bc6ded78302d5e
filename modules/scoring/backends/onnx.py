"""onnxruntime backend: execution providers from the device profile, threads from the CPU quota.

Thread discipline: ``threads`` CPUs are shared by ``concurrent`` calls that may run at once, so
each session run gets ``threads // concurrent`` intra-op threads (at least one) and calls never
add up to more threads than CPUs. Intra-op threads spin only when one run owns them all.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort

from modules.scoring.backends import BackendError, InferenceError, TensorSpec
from modules.scoring.cpus import allowed_cpus

if TYPE_CHECKING:
    from modules.contract import DeviceProfile

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"

# onnxruntime's type strings → OIP datatypes.
ORT_TO_OIP: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

ProviderChoice = tuple[str, dict[str, str]]


def choose_providers(profile: DeviceProfile, available: Sequence[str]) -> list[ProviderChoice]:
    """The profile's providers (with options) that ``available`` has, in the profile's order.

    Non-strict profiles always end with the CPU provider. A strict profile whose first provider is
    not available raises BackendError naming it and what is available.
    """
    if profile.onnxruntime is None:
        raise BackendError(f"profile {profile.name} has no 'onnxruntime' section")
    wanted = profile.onnxruntime.providers
    first = wanted[0].name
    if profile.strict and first not in available:
        raise BackendError(
            f"profile {profile.name} is strict: {first} is not available in this onnxruntime build "
            f"(available: {', '.join(available) or 'none'})"
        )
    chosen = [(p.name, _option_strings(p.options)) for p in wanted if p.name in available]
    if not profile.strict and CPU_PROVIDER not in (name for name, _ in chosen):
        chosen.append((CPU_PROVIDER, {}))
    return chosen


def _option_strings(options: dict[str, str | int | float | bool]) -> dict[str, str]:
    """Provider options as onnxruntime parses them: strings, booleans as ``1``/``0``."""
    return {k: ("1" if v else "0") if isinstance(v, bool) else str(v) for k, v in options.items()}


def tensor_spec(node: Any) -> TensorSpec:
    """A TensorSpec from an onnxruntime ``NodeArg`` (symbolic or unknown dimensions → None)."""
    datatype = ORT_TO_OIP.get(node.type)
    if datatype is None:
        raise ValueError(f"{node.name!r} has type {node.type}, which is not a supported tensor type")
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in node.shape)
    return TensorSpec(name=node.name, datatype=datatype, shape=shape)


class OnnxBackend:
    """A model loaded into an onnxruntime ``InferenceSession``; ``infer`` is thread-safe."""

    platform = "onnxruntime"

    def __init__(
        self,
        model_path: Path,
        profile: DeviceProfile,
        *,
        model_name: str,
        available_providers: Sequence[str] | None = None,
        threads: int | None = None,
        concurrent: int = 1,
    ) -> None:
        self.model_name = model_name
        available = list(
            ort.get_available_providers() if available_providers is None else available_providers
        )
        chosen = choose_providers(profile, available)
        requested = [p.name for p in profile.onnxruntime.providers] if profile.onnxruntime else []
        if requested[0] != chosen[0][0]:
            log.warning(
                "model %s: %s is not available in this onnxruntime build (available: %s); falling back to %s",
                model_name,
                requested[0],
                ", ".join(available),
                chosen[0][0],
            )
        cpus = allowed_cpus() if threads is None else threads
        self.concurrent = max(1, concurrent)
        self.threads = max(1, cpus // self.concurrent)
        """onnxruntime intra-op threads of one run."""
        self._session = self._create_session(model_path, chosen)
        self.provider: str = self._session.get_providers()[0]
        if self.provider != chosen[0][0]:
            if profile.strict:
                raise BackendError(
                    f"profile {profile.name} is strict: onnxruntime did not enable {chosen[0][0]} "
                    f"(its libraries may have failed to load); {model_name} would run on {self.provider}"
                )
            log.warning(
                "model %s: onnxruntime could not enable %s (its libraries may have failed to load); "
                "falling back to %s",
                model_name,
                chosen[0][0],
                self.provider,
            )
        try:
            self.inputs = tuple(tensor_spec(n) for n in self._session.get_inputs())
        except ValueError as e:
            raise BackendError(f"model {model_name}: input {e}") from None
        self.outputs = self._tensor_outputs()
        # onnxruntime computes in the graph's own types; the first input's type names them.
        self.precision = self.inputs[0].datatype.lower().replace("fp", "f") if self.inputs else "f32"
        self._output_names = [o.name for o in self.outputs]
        log.info(
            "model %s: onnxruntime %s, provider %s, %d intra-op thread(s) per run, %d run(s) at once (%s)",
            model_name,
            ort.__version__,
            self.provider,
            self.threads,
            self.concurrent,
            model_path,
        )

    def _create_session(self, model_path: Path, providers: list[ProviderChoice]) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        # Intra-op threads spin briefly between parallel sections only when one run at a time
        # owns them all (batches): waking a sleeping thread costs ~0.1 ms per operator on small
        # VMs. Several concurrent runs each spinning would take the CPUs from one another and
        # from the HTTP loop, so then idle threads sleep.
        spin = self.concurrent == 1 and self.threads > 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            with warnings.catch_warnings():
                # onnxruntime warns and drops a provider it cannot enable; the caller checks and logs.
                warnings.simplefilter("ignore", UserWarning)
                return ort.InferenceSession(str(model_path), options, providers=providers)
        except Exception as e:
            raise BackendError(
                f"onnxruntime cannot load model {self.model_name} from {model_path}: {e}"
            ) from e

    def _tensor_outputs(self) -> tuple[TensorSpec, ...]:
        """Tensor outputs; others (scikit-learn's ZipMap ``seq(map(...))``) are left out with a warning."""
        specs = []
        for node in self._session.get_outputs():
            try:
                specs.append(tensor_spec(node))
            except ValueError as e:
                log.warning(
                    "model %s: output %s; it is not served (for scikit-learn classifiers, convert with "
                    "skl2onnx options={'zipmap': False})",
                    self.model_name,
                    e,
                )
        if not specs:
            raise BackendError(f"model {self.model_name} has no tensor outputs to serve")
        return tuple(specs)

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model; raises InferenceError when onnxruntime fails."""
        try:
            results = self._session.run(self._output_names, feeds)
        except Exception as e:
            raise InferenceError(f"model {self.model_name}: onnxruntime failed: {e}") from e
        return dict(zip(self._output_names, results, strict=True))
