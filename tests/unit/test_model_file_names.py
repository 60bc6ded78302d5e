"""Which uploaded file names the model API accepts, and how a download names its file."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest
from aiohttp.multipart import content_disposition_filename, parse_content_disposition

from cloud.api.errors import ApiError
from cloud.api.routes_models import _content_disposition, _relative_path, _Spool


@pytest.mark.parametrize("name", ["model.onnx", "ir/model.xml", "café/模型 v2.bin", "a-b_c+d=e@f.bin"])
def test_printable_relative_names_are_accepted(name: str) -> None:
    assert _relative_path(name, "filename") == PurePosixPath(name)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "a file name is required"),
        ("../evil", "relative path without '.' or '..'"),
        ("/etc/passwd", "relative path"),
        ("a\\b", "relative path"),
        ("m\r\nX-Evil: 1", "holds '\\r': control characters"),
        ("m\x7f", "holds '\\x7f'"),
        ("m\u200b.onnx", "holds '\\u200b'"),  # zero-width space (a format character)
        ('m".onnx', "holds '\"'"),
        ("d/" + "x" * 256, "too long"),
        ("d/" * 600 + "x", "too long"),
    ],
)
def test_unsafe_names_are_refused_saying_why(name: str, why: str) -> None:
    with pytest.raises(ApiError) as err:
        _relative_path(name, "multipart part 0 (files)")
    assert err.value.status == 400
    assert str(err.value).startswith("multipart part 0 (files): ") and why in str(err.value)


@pytest.mark.parametrize("name", ["model.onnx", 'café "v2";\r\nX-Evil: 1.onnx', "模型.bin", ""])
def test_content_disposition_is_one_ascii_header_line_that_round_trips(name: str) -> None:
    header = _content_disposition(name)
    assert header.isascii() and header.isprintable()
    kind, params = parse_content_disposition(header)
    assert (kind, content_disposition_filename(params, "filename")) == ("attachment", name)
    assert params["filename"].isascii() and '"' not in params["filename"]


def test_spool_refuses_a_file_that_is_the_folder_of_another(tmp_path: Path) -> None:
    spool = _Spool(tmp_path, 100)
    spool.create(PurePosixPath("a/b.bin"), "part 0").close()
    for rel in ("a", "a/b.bin", "a/b.bin/c"):
        with pytest.raises(ApiError, match=f"part 1: file '{rel}' given twice or clashes"):
            spool.create(PurePosixPath(rel), "part 1")
    assert spool.files == {PurePosixPath("a/b.bin")}
