"""Request and response tensors for the scoring server: pure conversions, no I/O, no inference.

Three wire formats:

- **no-code** ``POST /score``: ``{"data": array}`` for single-input models or
  ``{"inputs": {name: array}}`` for any model (multi-input models need it). An input whose first
  dimension is dynamic also accepts one item without that dimension (``[x1, ..., x64]`` for a
  ``[-1, 64]`` input is one row). Answers ``{"result": array}`` for one output and
  ``{"outputs": {name: array}}`` for several.
- **Open Inference Protocol v2** JSON (``/v2/models/{name}/infer``): ``inputs[]`` with ``name``,
  ``shape``, ``datatype`` and ``data`` (flat row-major or nested), ``outputs[]`` to choose outputs.
- the OIP **binary tensor data extension** (KServe/Triton): the JSON header is followed by raw
  little-endian row-major tensors; ``Inference-Header-Content-Length`` gives the header's length,
  each binary tensor carries ``parameters.binary_data_size``; ``BYTES`` elements are a 4-byte
  little-endian length then the bytes. A request asks for binary outputs with
  ``outputs[].parameters.binary_data`` or, for all outputs, ``parameters.binary_data_output``.

Every conversion is a few numpy calls per tensor (no per-element Python work on numeric data).
Bad input raises InputError naming the input and what was expected, e.g.
``input 'float_input': expected shape [-1, 64] (FP32), got [1, 63]``.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import orjson

from modules.scoring.backends import OIP_TO_NUMPY, TensorSpec, oip_datatype

INFERENCE_HEADER = "Inference-Header-Content-Length"
"""HTTP header giving the length of the JSON part of a binary-extension request or response."""

_LENGTH = struct.Struct("<I")


class InputError(ValueError):
    """The request does not fit the model; the message names the input and what was expected."""


# --------------------------------------------------------------------------------------------
# Arrays
# --------------------------------------------------------------------------------------------


def _expected(spec: TensorSpec) -> str:
    return f"input '{spec.name}': expected shape {spec.shape_text()} ({spec.datatype})"


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _names(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(f"'{s.name}'" for s in specs) or "none"


def to_array(value: Any, spec: TensorSpec) -> np.ndarray:
    """``value`` (nested lists or an array) as an array of ``spec``'s dtype; shape is not checked.

    Integers and booleans convert to floats; floats convert to integers only when they are whole
    numbers in range; ``BYTES`` takes strings. Anything else (ragged lists, nulls, non-numeric
    strings, objects) raises InputError. Float inputs, the hot path, take one conversion pass,
    which also reads numeric strings such as ``"1.5"`` as numbers.
    """
    target = spec.dtype
    if target.kind == "f" and not isinstance(value, np.ndarray):
        try:
            with np.errstate(over="ignore"):
                arr = np.asarray(value, dtype=target)
        except (ValueError, TypeError, OverflowError):
            raise InputError(f"{_expected(spec)}, got data that is not a rectangular numeric array") from None
        if not np.isfinite(arr).all():  # JSON has no NaN or infinity: nulls, or numbers beyond the dtype
            raise InputError(f"{_expected(spec)}, got nulls or numbers out of range for {spec.datatype}")
        return arr
    try:
        raw = value if isinstance(value, np.ndarray) else np.asarray(value)
    except (ValueError, TypeError):  # ragged nesting
        raise InputError(f"{_expected(spec)}, got data that is not a rectangular numeric array") from None
    kind = raw.dtype.kind
    if target.kind == "O":
        if kind not in "US" and not (kind == "O" and raw.size == 0):
            raise InputError(f"{_expected(spec)}, got data that is not a rectangular array of strings")
        return raw.astype(object)
    if kind not in "biuf":
        raise InputError(f"{_expected(spec)}, got data that is not a rectangular numeric array")
    if raw.size and target.kind in "iu" and kind in "iuf":
        if kind == "f" and not (np.isfinite(raw).all() and (raw == np.trunc(raw)).all()):
            raise InputError(f"{_expected(spec)}, got numbers that are not whole")
        info = np.iinfo(target)
        if raw.min() < info.min or raw.max() > info.max:
            raise InputError(f"{_expected(spec)}, got numbers outside {info.min}..{info.max}")
    if raw.size and target.kind == "b" and kind != "b" and not ((raw == 0) | (raw == 1)).all():
        raise InputError(f"{_expected(spec)}, got values other than true/false/0/1")
    return raw.astype(target, copy=False)


def _check_dims(shape: Sequence[int], spec: TensorSpec) -> None:
    """Raise InputError unless ``shape`` has ``spec``'s rank and fixed dimensions."""
    if len(shape) != len(spec.shape) or any(
        d is not None and d != a for d, a in zip(spec.shape, shape, strict=False)
    ):
        raise InputError(f"{_expected(spec)}, got {_shape_text(shape)}")


def _check_shape(arr: np.ndarray, spec: TensorSpec, *, add_batch: bool = False) -> np.ndarray:
    """``arr`` if its shape fits ``spec``; ``add_batch`` gives a batch of one to an item without it."""
    rank = len(spec.shape)
    if add_batch and rank and arr.ndim == rank - 1 and spec.shape[0] is None:
        arr = arr[np.newaxis]
    _check_dims(arr.shape, spec)
    return arr


# --------------------------------------------------------------------------------------------
# No-code /score
# --------------------------------------------------------------------------------------------


def feeds_from_payload(payload: Any, specs: Sequence[TensorSpec]) -> dict[str, np.ndarray]:
    """Feeds from a no-code ``/score`` body: ``{"data": array}`` or ``{"inputs": {name: array}}``.

    ``data`` works for single-input models only. An item without the (dynamic) batch dimension
    counts as a batch of one: ``{"data": [x1, ..., x64]}`` feeds ``[[x1, ..., x64]]`` to a
    ``[-1, 64]`` input. Other keys in the body are ignored.
    """
    if not isinstance(payload, dict) or ("data" in payload) == ("inputs" in payload):
        raise InputError(
            'expected a JSON object with either {"data": array} (single-input models) or '
            f'{{"inputs": {{name: array}}}}; model inputs: {_names(specs)}'
        )
    if "data" in payload:
        if len(specs) != 1:
            raise InputError(
                f'this model has {len(specs)} inputs ({_names(specs)}): send {{"inputs": {{name: array}}}}'
            )
        spec = specs[0]
        return {spec.name: _check_shape(to_array(payload["data"], spec), spec, add_batch=True)}
    given = payload["inputs"]
    if not isinstance(given, dict):
        raise InputError(
            f"'inputs' must be an object mapping input names to arrays; model inputs: {_names(specs)}"
        )
    _check_names(given.keys(), specs)
    return {s.name: _check_shape(to_array(given[s.name], s), s, add_batch=True) for s in specs}


def _check_names(given: Any, specs: Sequence[TensorSpec]) -> None:
    expected = {s.name for s in specs}
    unknown = sorted(str(n) for n in given if n not in expected)
    missing = [s.name for s in specs if s.name not in given]
    problems = []
    if unknown:
        problems.append("unknown input(s) " + ", ".join(f"'{n}'" for n in unknown))
    if missing:
        problems.append("missing input(s) " + ", ".join(f"'{n}'" for n in missing))
    if problems:
        raise InputError(f"{'; '.join(problems)}; model inputs: {_names(specs)}")


def outputs_to_json(outputs: Mapping[str, np.ndarray], specs: Sequence[TensorSpec]) -> dict[str, Any]:
    """The no-code ``/score`` answer: ``{"result": nested list}`` for one output, else
    ``{"outputs": {name: nested list}}`` in the model's output order (strings for ``BYTES``)."""
    names = [s.name for s in specs if s.name in outputs] or list(outputs)
    if len(names) == 1:
        return {"result": _plain(outputs[names[0]]).tolist()}
    return {"outputs": {n: _plain(outputs[n]).tolist() for n in names}}


def _plain(arr: np.ndarray) -> np.ndarray:
    """``arr`` with ``bytes`` elements decoded to ``str``, so ``tolist()`` gives JSON-ready values."""
    arr = np.asarray(arr)
    if arr.dtype.kind in "SO":
        decode = np.vectorize(
            lambda x: x.decode("utf-8", "replace") if isinstance(x, bytes) else x, otypes=[object]
        )
        return decode(arr)
    return arr


# --------------------------------------------------------------------------------------------
# Open Inference Protocol v2: requests
# --------------------------------------------------------------------------------------------


class OipRequest(NamedTuple):
    """A parsed OIP request: ``feeds`` per input, ``outputs`` to return (name → as binary), the id."""

    feeds: dict[str, np.ndarray]
    outputs: dict[str, bool]
    request_id: str | None


def feeds_from_oip(
    body: Any,
    input_specs: Sequence[TensorSpec],
    output_specs: Sequence[TensorSpec],
    binary_inputs: Mapping[str, memoryview | bytes] | None = None,
) -> OipRequest:
    """Validate an OIP v2 inference request against the model and build its feeds.

    Each input needs ``name``, ``shape`` (matching the model's rank and fixed dimensions),
    ``datatype`` (exactly the model's) and ``data`` whose size matches ``shape``, or, with
    ``parameters.binary_data_size``, its bytes in ``binary_inputs`` (from ``parse_binary_request``).
    ``outputs`` lists all model outputs unless the request names some.
    """
    if not isinstance(body, dict):
        raise InputError('the request must be a JSON object with an "inputs" list')
    items = body.get("inputs")
    if not isinstance(items, list) or not items:
        raise InputError(
            '"inputs" must be a non-empty list of {name, shape, datatype, data}; '
            f"model inputs: {_names(input_specs)}"
        )
    by_name = {s.name: s for s in input_specs}
    feeds: dict[str, np.ndarray] = {}
    for i, item in enumerate(items):
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str):
            raise InputError(
                f"inputs[{i}] must be an object with a string 'name'; model inputs: {_names(input_specs)}"
            )
        spec = by_name.get(name)
        if spec is None:
            raise InputError(f"inputs[{i}]: unknown input '{name}'; model inputs: {_names(input_specs)}")
        if name in feeds:
            raise InputError(f"inputs[{i}]: input '{name}' is given twice")
        feeds[name] = _oip_input(item, spec, binary_inputs or {})
    _check_names(feeds.keys(), input_specs)
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InputError(f'"id" must be a string, got {type(request_id).__name__}')
    return OipRequest(feeds, _requested_outputs(body, output_specs), request_id)


def _params(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InputError(f"{where}: 'parameters' must be an object")
    return params


def _oip_input(
    item: dict[str, Any], spec: TensorSpec, binary_inputs: Mapping[str, memoryview | bytes]
) -> np.ndarray:
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise InputError(f"{_expected(spec)}, got shape {shape!r} (need a list of non-negative integers)")
    _check_dims(shape, spec)
    datatype = item.get("datatype")
    if datatype != spec.datatype:
        raise InputError(f"{_expected(spec)}, got datatype {datatype}")
    count = math.prod(shape)
    if "binary_data_size" in _params(item, f"input '{spec.name}'"):
        buffer = binary_inputs.get(spec.name)
        if buffer is None:
            raise InputError(
                f"input '{spec.name}' has parameters.binary_data_size but the request carries no binary data "
                f"(send the JSON length in the {INFERENCE_HEADER} header)"
            )
        arr = _from_binary(buffer, spec, count)
    else:
        if "data" not in item:
            raise InputError(f"{_expected(spec)}, got no 'data'")
        arr = to_array(item["data"], spec)
        if arr.size != count:
            raise InputError(
                f"{_expected(spec)}, got shape {_shape_text(shape)} ({count} values) "
                f"with {arr.size} values in data"
            )
    return arr.reshape(shape)


def _from_binary(buffer: memoryview | bytes, spec: TensorSpec, count: int) -> np.ndarray:
    """A flat array of ``count`` elements from binary-extension bytes."""
    if spec.datatype == "BYTES":
        elements = _unpack_bytes_elements(buffer, spec.name)
        if len(elements) != count:
            raise InputError(f"{_expected(spec)}, got {len(elements)} BYTES elements for {count} values")
        try:
            return np.array([e.decode("utf-8") for e in elements], dtype=object)
        except UnicodeDecodeError:
            raise InputError(f"{_expected(spec)}, got BYTES elements that are not UTF-8 text") from None
    wire = spec.dtype.newbyteorder("<")
    if len(buffer) != count * wire.itemsize:
        raise InputError(
            f"{_expected(spec)}, got {len(buffer)} bytes of binary data; {count} {spec.datatype} values need "
            f"{count * wire.itemsize}"
        )
    if spec.datatype == "BOOL" and count and np.frombuffer(buffer, dtype=np.uint8).max() > 1:
        raise InputError(f"{_expected(spec)}, got BOOL bytes other than 0 and 1")
    return np.frombuffer(buffer, dtype=wire).astype(spec.dtype, copy=False)


def _unpack_bytes_elements(buffer: memoryview | bytes, name: str) -> list[bytes]:
    view = memoryview(buffer).cast("B")
    out, offset = [], 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise InputError(f"input '{name}': BYTES data ends inside an element's 4-byte length")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise InputError(
                f"input '{name}': a BYTES element of {length} bytes runs past the end of its data"
            )
        out.append(bytes(view[offset : offset + length]))
        offset += length
    return out


def _requested_outputs(body: dict[str, Any], output_specs: Sequence[TensorSpec]) -> dict[str, bool]:
    all_binary = bool(_params(body, "request").get("binary_data_output", False))
    requested = body.get("outputs")
    if not requested:
        return {s.name: all_binary for s in output_specs}
    if not isinstance(requested, list):
        raise InputError(f'"outputs" must be a list of {{name}}; model outputs: {_names(output_specs)}')
    known = {s.name for s in output_specs}
    chosen: dict[str, bool] = {}
    for j, item in enumerate(requested):
        name = item.get("name") if isinstance(item, dict) else None
        if name not in known:
            raise InputError(f"outputs[{j}]: unknown output {name!r}; model outputs: {_names(output_specs)}")
        chosen[name] = bool(_params(item, f"output '{name}'").get("binary_data", all_binary))
    return chosen


def parse_binary_request(body: bytes, header_len: int) -> tuple[dict[str, Any], dict[str, memoryview]]:
    """Split a binary-extension request into its JSON header and each binary input's bytes.

    ``header_len`` is the ``Inference-Header-Content-Length`` header. The bytes after the JSON
    belong, in order, to the inputs with ``parameters.binary_data_size``; they must add up exactly.
    The returned views share ``body``'s memory.
    """
    if header_len < 0 or header_len > len(body):
        raise InputError(f"{INFERENCE_HEADER} is {header_len} but the body has {len(body)} bytes")
    view = memoryview(body)
    try:
        header = orjson.loads(view[:header_len])
    except orjson.JSONDecodeError as e:
        raise InputError(
            f"the first {header_len} bytes ({INFERENCE_HEADER}) are not a JSON object: {e}"
        ) from None
    if not isinstance(header, dict):
        raise InputError(f"the first {header_len} bytes ({INFERENCE_HEADER}) are not a JSON object")
    data = view[header_len:]
    buffers: dict[str, memoryview] = {}
    offset = 0
    items = header.get("inputs")
    for i, item in enumerate(items if isinstance(items, list) else []):
        if not isinstance(item, dict):
            continue
        size = _params(item, f"inputs[{i}]").get("binary_data_size")
        if size is None:
            continue
        name = item.get("name")
        if type(size) is not int or size < 0:
            raise InputError(
                f"inputs[{i}] ('{name}'): binary_data_size must be a non-negative integer, got {size!r}"
            )
        if offset + size > len(data):
            raise InputError(
                f"inputs[{i}] ('{name}'): binary_data_size {size} runs past the end of the body "
                f"({len(data) - offset} bytes left)"
            )
        buffers[str(name)] = data[offset : offset + size]
        offset += size
    if offset != len(data):
        raise InputError(
            f"the body has {len(data) - offset} bytes after the binary tensors "
            "that no binary_data_size accounts for"
        )
    return header, buffers


# --------------------------------------------------------------------------------------------
# Open Inference Protocol v2: responses
# --------------------------------------------------------------------------------------------


def oip_response(
    model_name: str,
    model_version: str | None,
    outputs: Mapping[str, np.ndarray],
    request_id: str | None = None,
) -> dict[str, Any]:
    """An OIP v2 JSON response (data flat, row-major) holding every array in ``outputs``."""
    response = _response_head(model_name, model_version, request_id)
    response["outputs"] = [
        {
            "name": name,
            "shape": list(arr.shape),
            "datatype": oip_datatype(arr.dtype),
            "data": _plain(arr).reshape(-1).tolist(),
        }
        for name, arr in outputs.items()
    ]
    return response


def encode_oip_response(
    model_name: str,
    model_version: str | None,
    outputs: Mapping[str, np.ndarray],
    request_id: str | None = None,
    requested: Mapping[str, bool] | None = None,
) -> tuple[bytes, int | None]:
    """The HTTP body of an OIP response and, when any output is binary, its JSON header length.

    ``requested`` (``OipRequest.outputs``) picks the outputs and which go as binary data; None
    returns all as JSON. With binary outputs, send the length as ``Inference-Header-Content-Length``
    and ``application/octet-stream``; without (length None) the body is plain JSON.
    """
    chosen = requested if requested is not None else dict.fromkeys(outputs, False)
    response = _response_head(model_name, model_version, request_id)
    entries, buffers = [], []
    for name, binary in chosen.items():
        arr = np.asarray(outputs[name])
        entry: dict[str, Any] = {"name": name, "shape": list(arr.shape), "datatype": oip_datatype(arr.dtype)}
        if binary:
            raw = _to_binary(arr)
            entry["parameters"] = {"binary_data_size": len(raw)}
            buffers.append(raw)
        else:
            entry["data"] = _json_data(arr)
        entries.append(entry)
    response["outputs"] = entries
    header = orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY)
    if not buffers:
        return header, None
    return b"".join([header, *buffers]), len(header)


def _response_head(model_name: str, model_version: str | None, request_id: str | None) -> dict[str, Any]:
    head: dict[str, Any] = {"model_name": model_name}
    if model_version is not None:
        head["model_version"] = model_version
    if request_id is not None:
        head["id"] = request_id
    return head


def _json_data(arr: np.ndarray) -> Any:
    """Flat data for orjson: numeric arrays as they are (fast path), others as lists."""
    if arr.dtype.kind in "biuf" and arr.dtype != np.float16:
        return np.ascontiguousarray(arr.reshape(-1), dtype=arr.dtype.newbyteorder("="))
    return _plain(arr).reshape(-1).tolist()


def _to_binary(arr: np.ndarray) -> bytes:
    """Little-endian row-major bytes; BYTES elements as 4-byte length + UTF-8 bytes."""
    if arr.dtype.kind in "USO":
        parts = []
        for element in arr.reshape(-1).tolist():
            raw = element if isinstance(element, bytes) else str(element).encode("utf-8")
            parts += [_LENGTH.pack(len(raw)), raw]
        return b"".join(parts)
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")).tobytes()


# --------------------------------------------------------------------------------------------
# Client side (tests, benchmarks, the CLI)
# --------------------------------------------------------------------------------------------


def encode_binary_request(
    inputs: Mapping[str, np.ndarray],
    *,
    outputs: Sequence[str] | None = None,
    binary_outputs: bool = True,
    request_id: str | None = None,
) -> tuple[bytes, int]:
    """A binary-extension request body sending every input as binary data, and its JSON length.

    ``outputs`` names the outputs wanted (all when None); ``binary_outputs`` asks for them as binary.
    """
    header: dict[str, Any] = {"inputs": []}
    if request_id is not None:
        header["id"] = request_id
    buffers = []
    for name, value in inputs.items():
        arr = np.asarray(value)
        raw = _to_binary(arr)
        header["inputs"].append(
            {
                "name": name,
                "shape": list(arr.shape),
                "datatype": oip_datatype(arr.dtype),
                "parameters": {"binary_data_size": len(raw)},
            }
        )
        buffers.append(raw)
    if outputs is not None:
        header["outputs"] = [{"name": n, "parameters": {"binary_data": binary_outputs}} for n in outputs]
    else:
        header["parameters"] = {"binary_data_output": binary_outputs}
    head = orjson.dumps(header)
    return b"".join([head, *buffers]), len(head)


def decode_oip_response(body: bytes, header_len: int | None = None) -> dict[str, np.ndarray]:
    """The output arrays of an OIP response body, JSON or binary (``header_len`` from its header).

    Raises ValueError when the body is malformed.
    """
    view = memoryview(body)
    end = len(view) if header_len is None else header_len
    response = orjson.loads(view[:end])
    data, offset = view[end:], 0
    arrays: dict[str, np.ndarray] = {}
    for item in response.get("outputs", []):
        datatype, shape = item["datatype"], item["shape"]
        size = item.get("parameters", {}).get("binary_data_size")
        if size is None:
            dtype = OIP_TO_NUMPY[datatype]
            arrays[item["name"]] = np.asarray(item["data"], dtype=dtype).reshape(shape)
            continue
        if offset + size > len(data):
            raise ValueError(
                f"output {item['name']!r}: binary_data_size {size} runs past the end of the body"
            )
        chunk = data[offset : offset + size]
        offset += size
        if datatype == "BYTES":
            values = _unpack_bytes_elements(chunk, item["name"])
            arrays[item["name"]] = np.array(values, dtype=object).reshape(shape)
        else:
            wire = OIP_TO_NUMPY[datatype].newbyteorder("<")
            arrays[item["name"]] = np.frombuffer(chunk, dtype=wire).reshape(shape)
    return arrays
