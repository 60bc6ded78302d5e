"""Entry script loading: how run() will be called, and the errors for unusable scripts."""

from __future__ import annotations

import itertools
import textwrap
from pathlib import Path

import pytest

from modules.scoring.entry import EntryScript, EntryScriptError, load_entry_script
from modules.scoring.inference_schema_compat import declared_schemas, is_input_conversion_error
from modules.scoring.raw import ScoringRequest, ScoringResponse

_names = itertools.count()


def _load(tmp_path: Path, source: str) -> EntryScript:
    path = tmp_path / f"score_{next(_names)}.py"
    path.write_text(textwrap.dedent(source))
    return load_entry_script(path, module_name=f"test_entry_{next(_names)}")


def test_plain_run(tmp_path: Path) -> None:
    script = _load(tmp_path, "def init(): pass\ndef run(raw_data): return raw_data\n")
    assert (script.kind, script.data_param, script.wants_headers) == ("plain", "raw_data", False)


def test_request_headers_parameter(tmp_path: Path) -> None:
    script = _load(tmp_path, "def init(): pass\ndef run(data, request_headers): return data\n")
    assert (script.kind, script.data_param, script.wants_headers) == ("plain", "data", True)


def test_our_rawhttp(tmp_path: Path) -> None:
    script = _load(
        tmp_path,
        """
        from modules.scoring import rawhttp
        def init(): pass
        @rawhttp
        def run(request): return request
        """,
    )
    assert script.kind == "raw"


def test_azureml_raw_imports_resolve_to_ours(tmp_path: Path) -> None:
    script = _load(
        tmp_path,
        """
        from azureml.contrib.services.aml_request import AMLRequest, rawhttp
        from azureml.contrib.services.aml_response import AMLResponse
        from azureml_inference_server_http.api.aml_response import AMLResponse as NewResponse
        def init(): pass
        @rawhttp
        def run(request):
            return AMLResponse({"ok": True}, 201, {"X-A": "1"}, json_str=True)
        """,
    )
    assert script.kind == "raw"
    request = ScoringRequest("POST", "/score", {}, {}, b"")
    assert isinstance(request, script.module.AMLRequest)
    response = script.run(request)
    assert isinstance(response, ScoringResponse) and isinstance(response, script.module.NewResponse)
    assert (response.status, response.body, response.content_type, response.headers) == (
        201,
        b'{"ok": true}',
        "application/json",
        {"X-A": "1"},
    )


def test_inference_schema_run(tmp_path: Path) -> None:
    script = _load(
        tmp_path,
        """
        import numpy as np
        from inference_schema.schema_decorators import input_schema, output_schema
        from inference_schema.parameter_types.numpy_parameter_type import NumpyParameterType
        from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType
        def init(): pass
        @input_schema("data", NumpyParameterType(np.array([[1.0, 2.0]])))
        @input_schema("scale", StandardPythonParameterType(2.0))
        @output_schema(NumpyParameterType(np.array([3.0])))
        def run(data, scale=1.0):
            return (data.sum(axis=1) * scale).tolist()
        """,
    )
    assert script.kind == "schema"
    assert [p.name for p in script.params] == ["data", "scale"]
    assert script.run(data=[[1, 2], [3, 4]], scale=2) == [6.0, 14.0]
    with pytest.raises(ValueError) as info:
        script.run(data=[[1, 2, 3]])
    assert is_input_conversion_error(info.value)
    request, response = declared_schemas(script.run)
    assert request is not None and response is not None
    assert request["example"]["data"] == [[1.0, 2.0]]
    assert request["properties"]["data"]["type"] == "array"
    assert response["example"] == [3.0]


def test_script_errors_are_not_conversion_errors(tmp_path: Path) -> None:
    script = _load(
        tmp_path,
        """
        from inference_schema.schema_decorators import input_schema
        from inference_schema.parameter_types.standard_py_parameter_type import StandardPythonParameterType
        def init(): pass
        @input_schema("data", StandardPythonParameterType([1]))
        def run(data):
            raise ValueError("the script's own problem")
        """,
    )
    with pytest.raises(ValueError) as info:
        script.run(data=[1])
    assert not is_input_conversion_error(info.value)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("def run(data): pass\n", "has no init\\(\\) function"),
        ("def init(): pass\n", "has no run\\(\\) function"),
        ("def init(): pass\ndef run(*args): pass\n", "cannot take positional-only, \\*args or \\*\\*kwargs"),
        ("def init(): pass\ndef run(): pass\n", "must take an argument"),
        ("def init(): pass\ndef run(a, b): pass\n", "only one parameter without a default"),
        ("import no_such_module_here\n", "importing entry script .* raised ModuleNotFoundError"),
        (
            "from modules.scoring import rawhttp\n"
            "from inference_schema.schema_decorators import input_schema\n"
            "from inference_schema.parameter_types import standard_py_parameter_type as t\n"
            "def init(): pass\n"
            "@rawhttp\n@input_schema('data', t.StandardPythonParameterType(1))\ndef run(data): pass\n",
            "both @rawhttp and @input_schema",
        ),
    ],
)
def test_unusable_scripts(tmp_path: Path, source: str, message: str) -> None:
    with pytest.raises(EntryScriptError, match=message):
        _load(tmp_path, source)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(EntryScriptError, match="does not exist"):
        load_entry_script(tmp_path / "nope.py")


def test_scoring_response_bodies() -> None:
    assert ScoringResponse(b"\x00\x01").content_type == "application/octet-stream"
    text = ScoringResponse("hi", 202, {"content-type": "text/csv"})
    assert (text.body, text.status, text.content_type, text.headers) == (b"hi", 202, "text/csv", {})
    assert ScoringResponse({"a": 1}).body == b'{"a":1}'
    assert ScoringResponse(b"", headers={"Content-Length": "9", "X-Kept": "1"}).headers == {"X-Kept": "1"}
    with pytest.raises(ValueError, match="between 100 and 599"):
        ScoringResponse(b"", 99)
