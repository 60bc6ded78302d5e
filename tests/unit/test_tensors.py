"""Request/response tensor conversion: no-code /score, OIP v2 JSON and the binary tensor extension."""

from __future__ import annotations

import struct

import numpy as np
import orjson
import pytest

from modules.scoring.backends import TensorSpec
from modules.scoring.tensors import (
    INFERENCE_HEADER,
    InputError,
    decode_oip_response,
    encode_binary_request,
    encode_oip_response,
    feeds_from_oip,
    feeds_from_payload,
    oip_response,
    outputs_to_json,
    parse_binary_request,
    to_array,
)

FLOAT_IN = TensorSpec("float_input", "FP32", (None, 64))
PAIR = (TensorSpec("a", "FP32", (None, 3)), TensorSpec("b", "INT64", (None, 1)))
OUTS = (TensorSpec("label", "INT64", (None,)), TensorSpec("probabilities", "FP32", (None, 10)))


# ------------------------------------------------------------------------------ no-code /score


def test_data_rows_become_float32_batch() -> None:
    rows = [[float(i)] * 64 for i in range(3)]
    feeds = feeds_from_payload({"data": rows}, [FLOAT_IN])
    assert list(feeds) == ["float_input"]
    assert feeds["float_input"].dtype == np.float32
    assert feeds["float_input"].shape == (3, 64)
    assert feeds["float_input"][2, 0] == 2.0


def test_one_dimensional_data_is_one_row() -> None:
    feeds = feeds_from_payload({"data": list(range(64))}, [FLOAT_IN])
    assert feeds["float_input"].shape == (1, 64)
    assert feeds["float_input"].dtype == np.float32
    np.testing.assert_array_equal(feeds["float_input"][0], np.arange(64, dtype=np.float32))


def test_inputs_object_feeds_every_input_with_its_dtype() -> None:
    feeds = feeds_from_payload({"inputs": {"a": [[1, 2, 3]], "b": [[7]]}}, PAIR)
    assert feeds["a"].dtype == np.float32 and feeds["a"].shape == (1, 3)
    assert feeds["b"].dtype == np.int64 and feeds["b"].tolist() == [[7]]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"data": [[0.0] * 63]}, "input 'float_input': expected shape [-1, 64] (FP32), got [1, 63]"),
        ({"data": [[[0.0] * 64]]}, "input 'float_input': expected shape [-1, 64] (FP32), got [1, 1, 64]"),
        ({"data": [[0.0] * 64, [0.0] * 63]}, "not a rectangular numeric array"),
        ({"data": [[0.0] * 63 + ["x"]]}, "not a rectangular numeric array"),
        (
            {"data": [[0.0] * 63 + [None]]},
            "input 'float_input': expected shape [-1, 64] (FP32), got nulls or numbers out of range for FP32",
        ),
        ({"data": [[1e300] * 64]}, "got nulls or numbers out of range for FP32"),
        ({"data": [[1.0] * 63 + [10**400]]}, "not a rectangular numeric array"),
        ({"data": {"x": 1}}, "not a rectangular numeric array"),
        ({"data": "abc"}, "not a rectangular numeric array"),
        ([1, 2, 3], "expected a JSON object with either"),
        ({"rows": []}, "expected a JSON object with either"),
        ({"data": [], "inputs": {}}, "expected a JSON object with either"),
    ],
)
def test_bad_single_input_payloads(payload: object, message: str) -> None:
    with pytest.raises(InputError) as err:
        feeds_from_payload(payload, [FLOAT_IN])
    assert message in str(err.value)
    assert "float_input" in str(err.value)


def test_float_inputs_read_numbers_booleans_and_numeric_strings() -> None:
    assert to_array([1, True, "2.5"], FLOAT_IN).tolist() == [1.0, 1.0, 2.5]


def test_data_for_a_multi_input_model_names_the_inputs() -> None:
    with pytest.raises(InputError, match=r"this model has 2 inputs \('a', 'b'\)"):
        feeds_from_payload({"data": [[1, 2, 3]]}, PAIR)


def test_unknown_and_missing_input_names_are_listed() -> None:
    with pytest.raises(InputError) as err:
        feeds_from_payload({"inputs": {"a": [[1, 2, 3]], "c": [[1]]}}, PAIR)
    assert str(err.value) == "unknown input(s) 'c'; missing input(s) 'b'; model inputs: 'a', 'b'"


def test_inputs_must_be_an_object() -> None:
    with pytest.raises(InputError, match="'inputs' must be an object mapping input names to arrays"):
        feeds_from_payload({"inputs": [[1, 2, 3]]}, PAIR)


def test_integer_inputs_reject_fractions_and_overflow_but_take_whole_floats() -> None:
    spec = TensorSpec("n", "INT8", (None,))
    assert to_array([1.0, -2.0], spec).tolist() == [1, -2]
    with pytest.raises(
        InputError, match=r"input 'n': expected shape \[-1\] \(INT8\), got numbers that are not whole"
    ):
        to_array([1.5], spec)
    with pytest.raises(InputError, match=r"got numbers outside -128\.\.127"):
        to_array([300], spec)


def test_bool_inputs_take_booleans_and_zero_one_only() -> None:
    spec = TensorSpec("flag", "BOOL", (None,))
    assert to_array([True, 0, 1], spec).tolist() == [True, False, True]
    with pytest.raises(InputError, match="got values other than true/false/0/1"):
        to_array([2], spec)


def test_bytes_inputs_take_strings_only() -> None:
    spec = TensorSpec("text", "BYTES", (None,))
    arr = to_array(["a", "bc"], spec)
    assert arr.dtype == object and arr.tolist() == ["a", "bc"]
    with pytest.raises(InputError, match="not a rectangular array of strings"):
        to_array([1, 2], spec)


def test_outputs_to_json_single_and_several() -> None:
    one = outputs_to_json({"label": np.array([3, 4], dtype=np.int64)}, OUTS[:1])
    assert one == {"result": [3, 4]}
    probs = np.full((2, 10), 0.5, dtype=np.float32)
    many = outputs_to_json({"probabilities": probs, "label": np.array([1, 2])}, OUTS)
    assert list(many["outputs"]) == ["label", "probabilities"]
    assert many["outputs"]["probabilities"][1][9] == 0.5
    assert orjson.loads(orjson.dumps(many)) == many


def test_outputs_to_json_decodes_bytes() -> None:
    spec = TensorSpec("name", "BYTES", (None,))
    assert outputs_to_json({"name": np.array([b"cat", "dog"], dtype=object)}, [spec]) == {
        "result": ["cat", "dog"]
    }


# ------------------------------------------------------------------------------ OIP v2 JSON


def _oip_inputs(*items: dict) -> dict:
    return {"id": "req-1", "inputs": list(items)}


A_JSON = {"name": "a", "shape": [2, 3], "datatype": "FP32", "data": [1, 2, 3, 4, 5, 6]}
B_JSON = {"name": "b", "shape": [2, 1], "datatype": "INT64", "data": [[7], [8]]}


def test_oip_request_flat_and_nested_data() -> None:
    request = feeds_from_oip(_oip_inputs(A_JSON, B_JSON), PAIR, OUTS)
    feeds, outputs, request_id = request
    assert feeds["a"].shape == (2, 3) and feeds["a"].dtype == np.float32
    assert feeds["a"][1].tolist() == [4, 5, 6]
    assert feeds["b"].tolist() == [[7], [8]]
    assert outputs == {"label": False, "probabilities": False}
    assert request_id == "req-1"


def test_oip_requested_outputs_and_binary_flags() -> None:
    body = _oip_inputs(A_JSON, B_JSON) | {
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "probabilities"}, {"name": "label", "parameters": {"binary_data": False}}],
    }
    assert feeds_from_oip(body, PAIR, OUTS).outputs == {"probabilities": True, "label": False}


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([A_JSON | {"shape": [2, 4]}, B_JSON], "input 'a': expected shape [-1, 3] (FP32), got [2, 4]"),
        (
            [A_JSON | {"datatype": "FP64"}, B_JSON],
            "input 'a': expected shape [-1, 3] (FP32), got datatype FP64",
        ),
        ([A_JSON | {"data": [1, 2, 3]}, B_JSON], "got shape [2, 3] (6 values) with 3 values in data"),
        ([A_JSON | {"shape": "2x3"}, B_JSON], "got shape '2x3' (need a list of non-negative integers)"),
        ([A_JSON | {"data": [1, 2, "x", 4, 5, 6]}, B_JSON], "not a rectangular numeric array"),
        (
            [{k: v for k, v in A_JSON.items() if k != "data"}, B_JSON],
            "input 'a': expected shape [-1, 3] (FP32), got no 'data'",
        ),
        ([A_JSON], "missing input(s) 'b'; model inputs: 'a', 'b'"),
        ([A_JSON, B_JSON, A_JSON], "inputs[2]: input 'a' is given twice"),
        ([A_JSON | {"name": "z"}, B_JSON], "inputs[0]: unknown input 'z'; model inputs: 'a', 'b'"),
        ([], '"inputs" must be a non-empty list'),
    ],
)
def test_oip_request_errors(items: list, message: str) -> None:
    with pytest.raises(InputError) as err:
        feeds_from_oip({"inputs": items}, PAIR, OUTS)
    assert message in str(err.value)


def test_oip_unknown_output_is_named() -> None:
    body = _oip_inputs(A_JSON, B_JSON) | {"outputs": [{"name": "nope"}]}
    with pytest.raises(
        InputError, match=r"outputs\[0\]: unknown output 'nope'; model outputs: 'label', 'probabilities'"
    ):
        feeds_from_oip(body, PAIR, OUTS)


def test_oip_json_round_trip() -> None:
    outputs: dict[str, np.ndarray] = {
        "label": np.array([3, 9], dtype=np.int64),
        "probabilities": np.linspace(0, 1, 20, dtype=np.float32).reshape(2, 10),
    }
    response = oip_response("digits", "2", outputs, "req-1")
    assert (
        response["model_name"] == "digits" and response["model_version"] == "2" and response["id"] == "req-1"
    )
    assert response["outputs"][1] | {"data": None} == {
        "name": "probabilities",
        "shape": [2, 10],
        "datatype": "FP32",
        "data": None,
    }
    body, header_len = encode_oip_response("digits", "2", outputs, "req-1")
    assert header_len is None
    assert orjson.loads(body)["outputs"][0] == {
        "name": "label",
        "shape": [2],
        "datatype": "INT64",
        "data": [3, 9],
    }
    decoded = decode_oip_response(body)
    np.testing.assert_array_equal(decoded["label"], outputs["label"])
    np.testing.assert_allclose(decoded["probabilities"], outputs["probabilities"], rtol=1e-6)
    # The plain dict says the same as the encoded body.
    for name, arr in decode_oip_response(orjson.dumps(response)).items():
        np.testing.assert_allclose(arr, outputs[name], rtol=1e-6)


# ------------------------------------------------------------------------------ binary extension


def test_binary_request_round_trip() -> None:
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.array([[7], [8]], dtype=np.int64)
    body, header_len = encode_binary_request({"a": a, "b": b}, outputs=["probabilities"], request_id="r")
    header, buffers = parse_binary_request(body, header_len)
    assert header["inputs"][0]["parameters"] == {"binary_data_size": 24}
    assert {k: len(v) for k, v in buffers.items()} == {"a": 24, "b": 16}
    feeds, outputs, request_id = feeds_from_oip(header, PAIR, OUTS, buffers)
    np.testing.assert_array_equal(feeds["a"], a)
    np.testing.assert_array_equal(feeds["b"], b)
    assert outputs == {"probabilities": True} and request_id == "r"


def test_binary_request_matches_the_documented_layout() -> None:
    # Written by hand from the extension's description: JSON, then little-endian row-major bytes.
    header = orjson.dumps(
        {
            "inputs": [
                {"name": "b", "shape": [2, 1], "datatype": "INT64", "parameters": {"binary_data_size": 16}}
            ]
        }
    )
    body = header + struct.pack("<2q", 5, -6)
    parsed, buffers = parse_binary_request(body, len(header))
    spec = TensorSpec("b", "INT64", (None, 1))
    feeds = feeds_from_oip(parsed, [spec], OUTS, buffers).feeds
    assert feeds["b"].tolist() == [[5], [-6]]


def test_binary_response_round_trip_mixed_json_and_binary() -> None:
    outputs: dict[str, np.ndarray] = {
        "label": np.array([3, 9], dtype=np.int64),
        "probabilities": np.linspace(0, 1, 20, dtype=np.float32).reshape(2, 10),
    }
    body, header_len = encode_oip_response(
        "digits", None, outputs, None, requested={"probabilities": True, "label": False}
    )
    assert header_len is not None
    header = orjson.loads(body[:header_len])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 80}
    assert "data" not in header["outputs"][0]
    assert header["outputs"][1]["data"] == [3, 9]
    assert body[header_len:] == outputs["probabilities"].astype("<f4").tobytes()
    decoded = decode_oip_response(body, header_len)
    np.testing.assert_array_equal(decoded["probabilities"], outputs["probabilities"])
    np.testing.assert_array_equal(decoded["label"], outputs["label"])


def test_binary_bytes_and_bool_tensors_round_trip() -> None:
    text, flags = TensorSpec("text", "BYTES", (None,)), TensorSpec("flags", "BOOL", (None,))
    values = {"text": np.array(["héllo", "", "x"], dtype=object), "flags": np.array([True, False, True])}
    body, header_len = encode_binary_request(values)
    header, buffers = parse_binary_request(body, header_len)
    assert (
        bytes(buffers["text"])
        == struct.pack("<I", 6) + "héllo".encode() + struct.pack("<I", 0) + b"\x01\x00\x00\x00x"
    )
    feeds = feeds_from_oip(header, [text, flags], OUTS, buffers).feeds
    assert feeds["text"].tolist() == ["héllo", "", "x"]
    assert feeds["flags"].tolist() == [True, False, True]
    out_body, out_len = encode_oip_response("m", None, values, requested={"text": True, "flags": True})
    decoded = decode_oip_response(out_body, out_len)
    assert decoded["text"].tolist() == [b"h\xc3\xa9llo", b"", b"x"]
    assert decoded["flags"].tolist() == [True, False, True]


def _binary_body(size_declared: int, payload: bytes) -> tuple[bytes, int]:
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "b",
                    "shape": [2, 1],
                    "datatype": "INT64",
                    "parameters": {"binary_data_size": size_declared},
                }
            ]
        }
    )
    return header + payload, len(header)


@pytest.mark.parametrize(
    ("declared", "payload", "message"),
    [
        (16, b"\0" * 8, "inputs[0] ('b'): binary_data_size 16 runs past the end of the body (8 bytes left)"),
        (8, b"\0" * 16, "the body has 8 bytes after the binary tensors"),
        (-1, b"", "binary_data_size must be a non-negative integer, got -1"),
    ],
)
def test_binary_request_size_errors(declared: int, payload: bytes, message: str) -> None:
    body, header_len = _binary_body(declared, payload)
    with pytest.raises(InputError) as err:
        parse_binary_request(body, header_len)
    assert message in str(err.value)


def test_binary_size_must_match_the_shape() -> None:
    body, header_len = _binary_body(8, b"\0" * 8)
    header, buffers = parse_binary_request(body, header_len)
    with pytest.raises(InputError, match=r"got 8 bytes of binary data; 2 INT64 values need 16"):
        feeds_from_oip(header, [TensorSpec("b", "INT64", (None, 1))], OUTS, buffers)


def test_binary_header_length_errors() -> None:
    body, header_len = _binary_body(16, b"\0" * 16)
    with pytest.raises(InputError, match=f"{INFERENCE_HEADER} is 9999 but the body has {len(body)} bytes"):
        parse_binary_request(body, 9999)
    with pytest.raises(InputError, match="are not a JSON object"):
        parse_binary_request(body, header_len - 1)


def test_binary_input_without_binary_part_is_explained() -> None:
    header, _ = parse_binary_request(*_binary_body(16, b"\0" * 16))
    with pytest.raises(
        InputError, match=r"has parameters\.binary_data_size but the request carries no binary data"
    ):
        feeds_from_oip(header, [TensorSpec("b", "INT64", (None, 1))], OUTS)
