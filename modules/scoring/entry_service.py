"""Entry-script mode: ``/score`` calls the script's ``run()``; see ``entry`` for the calling rules."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

from modules.contract import Batching, ModuleInfo
from modules.scoring.backends import TensorSpec
from modules.scoring.batching import Batcher, batch_metric_families, one_row
from modules.scoring.entry import EntryScript, load_entry_script
from modules.scoring.inference_schema_compat import declared_schemas, is_input_conversion_error
from modules.scoring.metrics import MetricFamilies
from modules.scoring.model_paths import MODEL_DIR_VARS
from modules.scoring.oip import declared_specs, oip_reply, oip_request, result_tensors, spec_json
from modules.scoring.openapi import schemas_from_samples
from modules.scoring.pool import InferencePool
from modules.scoring.raw import ScoringRequest, ScoringResponse
from modules.scoring.replies import (
    ClientError,
    Reply,
    dumps,
    media_type,
    parse_json,
    require_json_content_type,
)
from modules.scoring.service import INLINE_BYTES, ApiSchemas, ScoreCall

PLATFORM = "python-entry-script"


class EntryScriptService:
    """Serves an Azure ML-style ``score.py``."""

    mode = "entry-script"

    def __init__(
        self,
        script_path: Path,
        *,
        model_dir: Path | None,
        name: str,
        version: str,
        module: ModuleInfo | None = None,
        module_name: str = "entry_module",
        batching: Batching | None = None,
        max_queue: int = 256,
        timeout_s: float = 60.0,
    ) -> None:
        self.script_path = script_path
        self.model_dir = model_dir
        self.name = name
        self.version = version
        self.module_info = module
        self.module_name = module_name
        self.script: EntryScript | None = None
        self.accepts_raw_methods = False
        self.providers: dict[str, str] = {}
        self.batching = batching or Batching()
        self._batcher_limits = (max_queue, timeout_s)
        self.batcher: Batcher[str, Reply] | None = None
        self.oip_inputs: tuple[TensorSpec, ...] = ()
        """Inputs the script declares (for /v2/models/{name}/infer); none: infer is a 404."""
        self.oip_outputs: tuple[TensorSpec, ...] = ()
        """Set when the script has ``run_batch()`` and batching is on."""

    def _declared_tensors(self, script: EntryScript) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        """(inputs, outputs) the script declares: its inference_schema examples, else module.json's."""
        if script.kind == "raw":
            return (), ()
        if script.kind == "schema":
            request, response = declared_schemas(script.run)
            inputs = declared_specs((request or {}).get("example"))
            return inputs, declared_specs((response or {}).get("example"))
        info = self.module_info
        if info is None:
            return (), ()
        return declared_specs(info.input_sample), declared_specs(info.output_sample)

    def metric_families(self) -> MetricFamilies:
        """Batch sizes, when the script's run_batch() is used."""
        return batch_metric_families([self.batcher] if self.batcher is not None else [])

    def close(self) -> None:
        """Let the batch thread end (run() calls are the pool's)."""
        if self.batcher is not None:
            self.batcher.close()

    def load(self) -> dict[str, str]:
        """Set MODEL_DIR/AZUREML_MODEL_DIR, import the script and call its ``init()`` once."""
        if self.model_dir is not None:
            for var in MODEL_DIR_VARS:
                os.environ[var] = str(self.model_dir)
        script = load_entry_script(self.script_path, self.module_name)
        self.accepts_raw_methods = script.kind == "raw"
        script.init()
        self.script = script
        self.oip_inputs, self.oip_outputs = self._declared_tensors(script)
        if script.run_batch is not None and self.batching.max_batch_size > 1:
            max_queue, timeout_s = self._batcher_limits
            self.batcher = Batcher(
                self._run_batch,
                self.batching,
                name=self.name,
                key=one_row,
                max_queued=max_queue,
                timeout_s=timeout_s,
                inline_s=0,  # the script's own code: never on the event loop
            )
        self.providers = {self.name: _provider_of(script)}
        return self.providers

    def score(self, call: ScoreCall) -> Reply:
        """Call ``run()`` as its declaration asks and turn what it returns into a reply."""
        return _reply(self._run(call))

    def _run(self, call: ScoreCall) -> Any:
        """What ``run()`` returns for ``call``."""
        script = self.script
        assert script is not None, "score() before load()"
        kwargs = self._arguments(script, call)
        if script.wants_headers:
            kwargs["request_headers"] = dict(call.headers)
        try:
            result = script.run(**kwargs)
        except Exception as exc:
            if script.kind == "schema" and is_input_conversion_error(exc):
                raise ClientError(400, f"input does not match the declared schema: {exc}") from exc
            raise
        return result

    def _arguments(self, script: EntryScript, call: ScoreCall) -> dict[str, Any]:
        if script.kind == "raw":
            request = ScoringRequest(
                call.method, call.path, call.headers, call.query, call.body, call.query_string
            )
            return {script.data_param: request}
        content_type = call.headers.get("Content-Type")
        require_json_content_type(content_type)
        if script.kind == "plain":
            if media_type(content_type) != "text/plain":
                parse_json(call.body)
            try:
                return {script.data_param: call.body.decode()}
            except UnicodeDecodeError as exc:
                raise ClientError(400, f"the request body is not UTF-8 text: {exc}") from None
        document = parse_json(call.body)
        if not isinstance(document, dict):
            names = ", ".join(repr(p.name) for p in script.params)
            raise ClientError(400, f"the request body must be a JSON object with the fields {names}")
        kwargs = {}
        for param in script.params:
            value = document.get(param.name, param.default)
            if value is inspect.Parameter.empty:
                raise ClientError(400, f"the request body has no {param.name!r} field, which run() needs")
            kwargs[param.name] = value  # defaults passed explicitly, as Azure ML does
        return kwargs

    async def handle_score(self, call: ScoreCall, pool: InferencePool) -> Reply:
        """``score`` in a pool thread, or ``run_batch()`` with the requests waiting alongside."""
        script = self.script
        if self.batcher is None or script is None or script.wants_headers:
            return await pool.run(self.score, call)
        if len(call.body) <= INLINE_BYTES:
            arguments = self._arguments(script, call)
        else:
            arguments = await pool.run(self._arguments, script, call)
        return await self.batcher.infer(arguments[script.data_param])

    def _run_batch(self, data: list[str]) -> list[Reply]:
        """The script's run_batch() on the bodies of a batch (in the batch thread), as replies."""
        assert self.script is not None and self.script.run_batch is not None
        results = self.script.run_batch(data)
        if not isinstance(results, list | tuple):
            raise TypeError(
                f"run_batch() must return a list, one result per input; it returned {type(results).__name__}"
            )
        return [_reply(r) for r in results]

    async def handle_infer(self, model: str, call: ScoreCall, pool: InferencePool) -> Reply:
        """``infer`` in a pool thread (a 404 at once when the script declares no inputs)."""
        if not self.oip_inputs:
            return self.infer(model, call)
        return await pool.run(self.infer, model, call)

    def infer(self, model: str, call: ScoreCall) -> Reply:
        """Open Inference Protocol inference mapped onto ``run()``: each declared input becomes the
        JSON field of the same name, what ``run()`` returns becomes the outputs.

        Only for scripts whose inputs are declared (``inference_schema`` decorators or a module
        input sample that is a JSON object); others get a 404 that points to /score.
        """
        if not self.oip_inputs:
            raise ClientError(
                404,
                f"{model!r} is served by an entry script that declares no inputs: use POST /score, or "
                "declare them (inference_schema @input_schema, or an input sample like "
                '{"data": [[...]]}) for /v2/models/{name}/infer',
            )
        # Without declared outputs, the one output run() returns is called "output".
        known_outputs = self.oip_outputs or (TensorSpec("output", "BYTES", ()),)
        request = oip_request(call, self.oip_inputs, known_outputs)
        body = dumps({name: array.tolist() for name, array in request.feeds.items()})
        json_call = ScoreCall("POST", call.path, {"Content-Type": "application/json"}, {}, "", body)
        result = self._run(json_call)
        if isinstance(result, ScoringResponse):
            raise TypeError("run() answered with a ScoringResponse; /v2/models/{name}/infer needs data")
        outputs = result_tensors(result, self.oip_outputs)
        if self.oip_outputs:
            requested = request.outputs
        else:  # every tensor run() returned, as binary when the request asked for binary output
            requested = dict.fromkeys(outputs, request.outputs.get("output", False))
        missing = sorted(set(requested) - set(outputs))
        if missing:
            raise ValueError(f"run() returned no {', '.join(missing)} (it returned {', '.join(outputs)})")
        return oip_reply(self.name, self.version, outputs, request.request_id, requested)

    def model_names(self) -> list[str]:
        """The module itself, under its name."""
        return [self.name]

    def metadata(self, model: str) -> dict[str, Any] | None:
        """Open Inference Protocol metadata, with the inputs and outputs the script declares (if any)."""
        if model != self.name:
            return None
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": PLATFORM,
            "inputs": [spec_json(s) for s in self.oip_inputs],
            "outputs": [spec_json(s) for s in self.oip_outputs],
            "parameters": {"execution_provider": self.providers.get(self.name, "unknown")},
        }

    def api_schemas(self) -> ApiSchemas:
        """inference_schema's samples when the script declares them, else module.json's."""
        if self.script is not None and self.script.kind == "schema":
            request, response = declared_schemas(self.script.run)
            return ApiSchemas(request, response, "inference_schema")
        return schemas_from_samples(self.module_info)

    def describe(self) -> str:
        """Script path and how run() is called."""
        kind = self.script.kind if self.script else "unloaded"
        return f"script={self.script_path} run={kind} model_dir={self.model_dir or '-'}"


def _reply(result: Any) -> Reply:
    if isinstance(result, ScoringResponse):
        return Reply(result.body, result.status, result.content_type, result.headers or None)
    try:
        return Reply(dumps(result))
    except TypeError as exc:
        raise TypeError(f"run() returned a value that cannot be sent as JSON: {exc}") from exc


def _provider_of(script: EntryScript) -> str:
    """The execution provider of an onnxruntime session the script keeps in a global, if any.

    Entry scripts create their own sessions; a global ``InferenceSession`` is the common pattern
    (``init()`` assigns it), and its first provider is the one that runs the model.
    """
    for value in vars(script.module).values():
        if type(value).__name__ == "InferenceSession" and hasattr(value, "get_providers"):
            providers = value.get_providers()
            if providers:
                return str(providers[0])
    return "unknown"
