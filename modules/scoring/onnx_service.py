"""No-code mode: the server runs the module's ONNX model(s) itself, with the profile's backend.

``POST /score`` takes ``{"data": array}`` (single-input models) or ``{"inputs": {name: array}}``
and needs exactly one model in the module; ``/v2/models/{name}/infer`` speaks the Open Inference
Protocol (JSON, or the binary tensor data extension) for every model.

A model whose inputs and outputs all have a dynamic batch dimension is batched (``batching.py``):
one batch at a time runs on all the CPUs. Any other model runs as many requests at once as there
are CPUs, each on one thread. Either way no more inference threads run than there are CPUs. A worker
process (``SCORING_WORKERS``) has its share of the CPUs; it also opens its batched models a second
time with every CPU's threads (spinning), for requests that keep coming one at a time (c=1
latency; ``batching.LONE_STREAK``); under load its batches use the first session.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from modules.contract import BATCH_SIZE_ENV
from modules.scoring.backends import BackendError, InferenceBackend, InferenceError, load_backend
from modules.scoring.batching import (
    INLINE_RUN_S,
    SOLE_CPU_INLINE_RUN_S,
    Batcher,
    batch_metric_families,
    batchable,
    feeds_key,
    tensor_batches,
)
from modules.scoring.config import ServerConfig
from modules.scoring.metrics import MetricFamilies
from modules.scoring.model_paths import ModelLocation, list_models
from modules.scoring.oip import oip_reply, oip_request, spec_json
from modules.scoring.openapi import schemas_from_samples, schemas_from_specs
from modules.scoring.pool import InferencePool
from modules.scoring.replies import ClientError, Reply, dumps, parse_json, require_json_content_type
from modules.scoring.service import INLINE_BYTES, ApiSchemas, ScoreCall
from modules.scoring.tensors import (
    InputError,
    OipRequest,
    feeds_from_payload,
    outputs_to_json,
)

log = logging.getLogger(__name__)

_INVALID_ARGUMENT = "InvalidArgument"
"""onnxruntime's exception type for inputs the model rejects (the client's mistake)."""


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
        self.batchers: dict[str, Batcher[dict[str, Any], dict[str, Any]]] = {}
        self.unbatched: dict[str, str] = {}
        """Models that are not batched, and why."""
        self.lone_backends: dict[str, InferenceBackend] = {}
        """In a worker process: a second session per batched model with every CPU's threads, for
        requests that come one at a time (``batching.LONE_STREAK``)."""

    def load(self) -> dict[str, str]:
        """Load the device profile and every model; BackendError when a model cannot run as configured."""
        from modules.profiles import ProfileError, get_profile

        try:
            profile = get_profile(self.config.profile, self.config.profiles_dir)
        except ProfileError as exc:
            raise BackendError(f"device profile {self.config.profile!r}: {exc}") from exc
        settings, cpus = self.config.batching, self.config.threads
        worker = self.config.worker
        all_cpus = cpus * worker.count if worker is not None else cpus
        for name, location in self.locations.items():
            concurrent = 1 if settings.max_batch_size > 1 else cpus
            backend = load_backend(
                location.path, profile, model_name=name, threads=cpus, concurrent=concurrent
            )
            why_not = (
                batchable(backend.inputs, backend.outputs)
                if concurrent == 1
                else f"batching is off ({BATCH_SIZE_ENV}=1)"
            )
            if why_not is None:
                lone = None
                if all_cpus > cpus:  # a worker: requests that come alone may use every CPU
                    lone = load_backend(
                        location.path, profile, model_name=name, threads=all_cpus, concurrent=1
                    )
                    self.lone_backends[name] = lone
                self.batchers[name] = Batcher(
                    tensor_batches(backend.infer),
                    settings,
                    name=name,
                    key=feeds_key,
                    max_queued=self.config.max_queue,
                    timeout_s=self.config.timeout_s,
                    inline_s=INLINE_RUN_S if cpus > 1 else SOLE_CPU_INLINE_RUN_S,
                    run_lone=None if lone is None else lone.infer,
                )
                log.info(
                    "model %s: batched, up to %d rows, waiting at most %g ms, %d inference thread(s)",
                    name,
                    settings.max_batch_size,
                    settings.max_batch_delay_ms,
                    cpus,
                )
            else:
                if concurrent == 1 and cpus > 1:  # opened for batches: reopen for concurrent calls
                    backend = load_backend(
                        location.path, profile, model_name=name, threads=cpus, concurrent=cpus
                    )
                self.unbatched[name] = why_not
                log.info(
                    "model %s: not batched: %s; %d request(s) at once, one thread each", name, why_not, cpus
                )
            self.backends[name] = backend
        return {name: backend.provider for name, backend in self.backends.items()}

    def close(self) -> None:
        """Let the batch threads end."""
        for batcher in self.batchers.values():
            batcher.close()

    def metric_families(self) -> MetricFamilies:
        """Batch sizes, queues and split batches per batched model, for ``/metrics``."""
        return batch_metric_families(list(self.batchers.values()))

    def _only_model(self) -> str:
        if len(self.backends) != 1:
            names = ", ".join(self.backends)
            raise ClientError(
                400,
                f"this module serves {len(self.backends)} models ({names}): "
                "use POST /v2/models/{name}/infer",
            )
        return next(iter(self.backends))

    def score(self, call: ScoreCall) -> Reply:
        """``{"data": ...}`` or ``{"inputs": {...}}`` in; ``{"outputs": ...}`` out; blocking, unbatched."""
        model = self._only_model()
        feeds = self._score_feeds(model, call)
        return self._score_reply(model, _infer(self.backends[model].infer, feeds))

    def infer(self, model: str, call: ScoreCall) -> Reply:
        """Open Inference Protocol inference, JSON or binary tensor data extension; blocking, unbatched."""
        request = self._oip_request(model, call)
        return self._oip_reply(model, request, _infer(self.backends[model].infer, request.feeds))

    async def handle_score(self, call: ScoreCall, pool: InferencePool) -> Reply:
        """``score``, with batched models' requests waiting for their batch on the loop."""
        model = self._only_model()
        batcher = self.batchers.get(model)
        if batcher is None:
            return await pool.run(self.score, call)
        inline = len(call.body) <= INLINE_BYTES
        feeds = self._score_feeds(model, call) if inline else await pool.run(self._score_feeds, model, call)
        outputs = await _infer_batched(batcher, feeds)
        return (
            self._score_reply(model, outputs) if inline else await pool.run(self._score_reply, model, outputs)
        )

    async def handle_infer(self, model: str, call: ScoreCall, pool: InferencePool) -> Reply:
        """``infer``, with batched models' requests waiting for their batch on the loop."""
        batcher = self.batchers.get(model)
        if batcher is None:
            return await pool.run(self.infer, model, call)
        inline = len(call.body) <= INLINE_BYTES
        request = self._oip_request(model, call) if inline else await pool.run(self._oip_request, model, call)
        outputs = await _infer_batched(batcher, request.feeds)
        if inline:
            return self._oip_reply(model, request, outputs)
        return await pool.run(self._oip_reply, model, request, outputs)

    def _score_feeds(self, model: str, call: ScoreCall) -> dict[str, Any]:
        require_json_content_type(call.headers.get("Content-Type"))
        payload = parse_json(call.body)
        try:
            return feeds_from_payload(payload, self.backends[model].inputs)
        except InputError as exc:
            raise ClientError(400, str(exc)) from None

    def _score_reply(self, model: str, outputs: dict[str, Any]) -> Reply:
        return Reply(dumps(outputs_to_json(outputs, self.backends[model].outputs)))

    def _oip_request(self, model: str, call: ScoreCall) -> OipRequest:
        backend = self.backends.get(model)
        if backend is None:
            raise ClientError(404, f"no model {model!r} (models: {', '.join(self.locations)})")
        return oip_request(call, backend.inputs, backend.outputs)

    def _oip_reply(self, model: str, request: OipRequest, outputs: dict[str, Any]) -> Reply:
        version = self.locations[model].version
        return oip_reply(model, version, outputs, request.request_id, request.outputs)

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
            "inputs": [spec_json(s) for s in backend.inputs] if backend else [],
            "outputs": [spec_json(s) for s in backend.outputs] if backend else [],
            "parameters": {
                "execution_provider": backend.provider if backend else "loading",
                "precision": backend.precision if backend else "loading",
                "batching": self._batching(model),
            },
        }

    def _batching(self, model: str) -> dict[str, Any]:
        batcher = self.batchers.get(model)
        if batcher is None:
            return {"enabled": False, "reason": self.unbatched.get(model, "loading")}
        return {"enabled": True, **batcher.settings.model_dump()}

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


def _infer(run: Callable[[dict[str, Any]], dict[str, Any]], feeds: dict[str, Any]) -> dict[str, Any]:
    """Run the model; onnxruntime's InvalidArgument (e.g. inconsistent dynamic sizes) is a 400."""
    try:
        return run(feeds)
    except InferenceError as exc:
        client = _client_error(exc)
        if client is None:
            raise
        raise client from exc


async def _infer_batched(
    batcher: Batcher[dict[str, Any], dict[str, Any]], feeds: dict[str, Any]
) -> dict[str, Any]:
    """``_infer`` through the model's batcher."""
    try:
        return await batcher.infer(feeds)
    except InferenceError as exc:
        client = _client_error(exc)
        if client is None:
            raise
        raise client from exc


def _client_error(exc: InferenceError) -> ClientError | None:
    """A 400 for inputs the model rejected (onnxruntime's InvalidArgument), None for other failures."""
    if type(exc.__cause__).__name__ == _INVALID_ARGUMENT:
        return ClientError(400, str(exc))
    return None
