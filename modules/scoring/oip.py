"""Open Inference Protocol requests and answers as the services see them (``ScoreCall`` ↔ tensors).

Both services speak it: no-code ONNX models with the model's own tensor specs, entry scripts
with the inputs their ``inference_schema`` decorators or module samples declare
(``declared_specs``), mapped onto ``run()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from modules.scoring.backends import TensorSpec, oip_datatype
from modules.scoring.replies import ClientError, Reply, parse_json, require_json_content_type
from modules.scoring.service import ScoreCall
from modules.scoring.tensors import (
    INFERENCE_HEADER,
    InputError,
    OipRequest,
    encode_oip_response,
    feeds_from_oip,
    parse_binary_request,
)


def spec_json(spec: TensorSpec) -> dict[str, Any]:
    """A tensor as ``/v2/models/{name}`` metadata lists it (-1 for a dynamic dimension)."""
    return {
        "name": spec.name,
        "datatype": spec.datatype,
        "shape": [-1 if d is None else d for d in spec.shape],
    }


def oip_request(call: ScoreCall, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> OipRequest:
    """The inference request in ``call`` (JSON, or the binary tensor data extension), checked
    against ``inputs`` and ``outputs``; ClientError 400 saying what is wrong."""
    header_len = call.headers.get(INFERENCE_HEADER)
    try:
        if header_len is not None:
            if not header_len.strip().isdigit():
                raise ClientError(400, f"{INFERENCE_HEADER} must be a byte count, got {header_len!r}")
            body, buffers = parse_binary_request(call.body, int(header_len))
        else:
            require_json_content_type(call.headers.get("Content-Type"))
            body, buffers = parse_json(call.body), None
        return feeds_from_oip(body, inputs, outputs, buffers)
    except InputError as exc:
        raise ClientError(400, str(exc)) from None


def oip_reply(
    model: str,
    version: str | None,
    outputs: Mapping[str, np.ndarray],
    request_id: str | None,
    requested: Mapping[str, bool] | None,
) -> Reply:
    """The inference answer: JSON, or with binary outputs ``application/octet-stream`` and the
    header length."""
    payload, json_len = encode_oip_response(model, version, outputs, request_id, requested)
    if json_len is None:
        return Reply(payload)
    return Reply(payload, 200, "application/octet-stream", {INFERENCE_HEADER: str(json_len)})


def _spec(name: str, value: Any) -> TensorSpec | None:
    """A tensor spec from an example value: its datatype (floats as FP32) and shape, any batch size."""
    try:
        arr = np.asarray(value)
        datatype = "FP32" if arr.dtype.kind == "f" else oip_datatype(arr.dtype)
    except ValueError:
        return None
    if arr.ndim == 0 or arr.dtype.kind not in "biufUS":
        return None
    return TensorSpec(name=name, datatype=datatype, shape=(None, *arr.shape[1:]))


def declared_specs(example: Any) -> tuple[TensorSpec, ...]:
    """Tensor specs of a JSON object example (``{"data": [[...]]}``): one per array field.

    Anything else (no example, a list, scalars, nested objects) declares nothing.
    """
    if not isinstance(example, dict):
        return ()
    specs = (_spec(str(k), v) for k, v in example.items())
    return tuple(s for s in specs if s is not None)


def result_tensors(result: Any, outputs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """What ``run()`` returned, as named arrays: a dict's fields, or one value under the one
    declared output's name (``output`` when none is declared). ValueError for other shapes."""
    if isinstance(result, dict):
        return {str(k): np.asarray(v) for k, v in result.items()}
    if len(outputs) > 1:
        names = ", ".join(s.name for s in outputs)
        raise ValueError(f"run() returned a {type(result).__name__}, not an object with {names}")
    return {outputs[0].name if outputs else "output": np.asarray(result)}
