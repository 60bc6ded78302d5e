"""No-code mode: the server runs the module's ONNX model(s) itself, with the profile's backend.

``POST /score`` takes ``{"data": array}`` (single-input models) or ``{"inputs": {name: array}}``
and needs exactly one model in the module; ``/v2/models/{name}/infer`` speaks the Open Inference
Protocol (JSON, or the binary tensor data extension) for every model.
"""

from __future__ import annotations

from typing import Any

from modules.scoring.backends import BackendError, InferenceBackend, InferenceError, TensorSpec, load_backend
from modules.scoring.config import ServerConfig
from modules.scoring.model_paths import ModelLocation, list_models
from modules.scoring.openapi import schemas_from_samples, schemas_from_specs
from modules.scoring.replies import ClientError, Reply, dumps, parse_json, require_json_content_type
from modules.scoring.service import ApiSchemas, ScoreCall
from modules.scoring.tensors import (
    INFERENCE_HEADER,
    InputError,
    encode_oip_response,
    feeds_from_oip,
    feeds_from_payload,
    outputs_to_json,
    parse_binary_request,
)

_INVALID_ARGUMENT = "InvalidArgument"
"""onnxruntime's exception type for inputs the model rejects (the client's mistake)."""


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "datatype": spec.datatype,
        "shape": [-1 if d is None else d for d in spec.shape],
    }


class OnnxService:
    """Serves ONNX models without an entry script."""

    mode = "no-code"
    accepts_raw_methods = False

    def __init__(self, config: ServerConfig) -> None:
        assert config.model_dir is not None
        self.config = config
        found = list_models(config.model_dir)
        if len(found) == 1 and config.model_name:
            found = [ModelLocation(config.model_name, found[0].version, found[0].path)]
        self.locations = {m.name: m for m in found}
        self.backends: dict[str, InferenceBackend] = {}

    def load(self) -> dict[str, str]:
        """Load the device profile and every model; BackendError when a model cannot run as configured."""
        from modules.profiles import ProfileError, get_profile

        try:
            profile = get_profile(self.config.profile, self.config.profiles_dir)
        except ProfileError as exc:
            raise BackendError(f"device profile {self.config.profile!r}: {exc}") from exc
        for name, location in self.locations.items():
            self.backends[name] = load_backend(location.path, profile, model_name=name)
        return {name: backend.provider for name, backend in self.backends.items()}

    def _only_backend(self) -> InferenceBackend:
        if len(self.backends) != 1:
            names = ", ".join(self.backends)
            raise ClientError(
                400,
                f"this module serves {len(self.backends)} models ({names}): "
                "use POST /v2/models/{name}/infer",
            )
        return next(iter(self.backends.values()))

    def score(self, call: ScoreCall) -> Reply:
        """``{"data": ...}`` or ``{"inputs": {...}}`` in; ``{"result": ...}`` or ``{"outputs": ...}`` out."""
        backend = self._only_backend()
        require_json_content_type(call.headers.get("Content-Type"))
        payload = parse_json(call.body)
        try:
            feeds = feeds_from_payload(payload, backend.inputs)
        except InputError as exc:
            raise ClientError(400, str(exc)) from None
        outputs = _infer(backend, feeds)
        return Reply(dumps(outputs_to_json(outputs, backend.outputs)))

    def infer(self, model: str, call: ScoreCall) -> Reply:
        """Open Inference Protocol inference, JSON or binary tensor data extension."""
        backend = self.backends.get(model)
        if backend is None:
            raise ClientError(404, f"no model {model!r} (models: {', '.join(self.locations)})")
        header_len = call.headers.get(INFERENCE_HEADER)
        try:
            if header_len is not None:
                if not header_len.strip().isdigit():
                    raise ClientError(400, f"{INFERENCE_HEADER} must be a byte count, got {header_len!r}")
                body, buffers = parse_binary_request(call.body, int(header_len))
            else:
                require_json_content_type(call.headers.get("Content-Type"))
                body, buffers = parse_json(call.body), None
            request = feeds_from_oip(body, backend.inputs, backend.outputs, buffers)
        except InputError as exc:
            raise ClientError(400, str(exc)) from None
        outputs = _infer(backend, request.feeds)
        payload, json_len = encode_oip_response(
            model, self.locations[model].version, outputs, request.request_id, request.outputs
        )
        if json_len is None:
            return Reply(payload)
        return Reply(payload, 200, "application/octet-stream", {INFERENCE_HEADER: str(json_len)})

    def model_names(self) -> list[str]:
        """Every model in the module."""
        return list(self.locations)

    def metadata(self, model: str) -> dict[str, Any] | None:
        """Open Inference Protocol metadata, with the execution provider in ``parameters``."""
        location = self.locations.get(model)
        if location is None:
            return None
        backend = self.backends.get(model)
        return {
            "name": model,
            "versions": [location.version],
            "platform": backend.platform if backend else "loading",
            "inputs": [_spec_json(s) for s in backend.inputs] if backend else [],
            "outputs": [_spec_json(s) for s in backend.outputs] if backend else [],
            "parameters": {
                "execution_provider": backend.provider if backend else "loading",
                "precision": backend.precision if backend else "loading",
            },
        }

    def api_schemas(self) -> ApiSchemas:
        """module.json's samples, else the single model's inputs and outputs."""
        samples = schemas_from_samples(self.config.module)
        if samples.source != "none" or len(self.backends) != 1:
            return samples
        backend = next(iter(self.backends.values()))
        return schemas_from_specs(backend.inputs, backend.outputs)

    def describe(self) -> str:
        """Models, versions and the profile."""
        models = ",".join(f"{m.name}:{m.version}" for m in self.locations.values())
        return f"models={models} profile={self.config.profile} model_dir={self.config.model_dir}"


def _infer(backend: InferenceBackend, feeds: dict[str, Any]) -> dict[str, Any]:
    """Run the model; onnxruntime's InvalidArgument (e.g. inconsistent dynamic sizes) is a 400."""
    try:
        return backend.infer(feeds)
    except InferenceError as exc:
        if type(exc.__cause__).__name__ == _INVALID_ARGUMENT:
            raise ClientError(400, str(exc)) from exc
        raise
