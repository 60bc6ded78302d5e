"""modules/documents.py: strict YAML/JSON loading, errors with file, line and field."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import pytest

from modules.contract import DeploymentManifest
from modules.documents import DocumentError, load_document, load_model, load_model_file

MANIFEST = """\
name: shop
target:
  profile: cpu
modules:
  web:
    images:
      cpu: localhost:5000/shop/web:1.0
    ports:
      - container: 5001
        host: 8080
  db:
    images:
      cpu: localhost:5000/shop/db:1.0
"""


def test_yaml_and_json_give_the_same_data() -> None:
    from_yaml = load_document(MANIFEST, "deploy.yaml")
    from_json = load_document(
        '{"name": "shop", "target": {"profile": "cpu"}, "modules": {"web": {"images": '
        '{"cpu": "localhost:5000/shop/web:1.0"}, "ports": [{"container": 5001, "host": 8080}]}, '
        '"db": {"images": {"cpu": "localhost:5000/shop/db:1.0"}}}}',
        "deploy.json",
    )
    assert from_yaml == from_json
    assert from_yaml["modules"]["web"]["ports"][0] == {"container": 5001, "host": 8080}


@pytest.mark.parametrize(
    ("text", "source", "expected"),
    [
        (
            "a: 1\nb:\n  web: 1\n  db: 2\n  web: 3\n",
            "deploy.yaml",
            "deploy.yaml:5: duplicate key 'web' in mapping (first on line 3)",
        ),
        ("name: x\nname: y\n", "top.yaml", "top.yaml:2: duplicate key 'name' in mapping (first on line 1)"),
        ("- {a: 1, a: 2}\n", "flow.yaml", "flow.yaml:1: duplicate key 'a' in mapping"),
        (
            '{"a": 1,\n "b": {"web": 1,\n  "web": 2}}',
            "deploy.json",
            "deploy.json:3: duplicate key 'web' in mapping (first on line 2)",
        ),
        ('{"x": 1, "x": 1}', "same.json", "same.json:1: duplicate key 'x' in mapping"),
    ],
)
def test_duplicate_keys_are_rejected_with_file_line_and_key(text: str, source: str, expected: str) -> None:
    with pytest.raises(DocumentError) as exc:
        load_document(text, source)
    assert str(exc.value).startswith(expected)


def test_merge_keys_may_be_overridden() -> None:
    data = load_document("base: &b {x: 1, y: 2}\nm:\n  <<: *b\n  x: 3\n", "merge.yaml")
    assert data["m"] == {"x": 3, "y": 2}


@pytest.mark.parametrize(
    ("text", "source", "expected"),
    [
        ("a: [1,\n", "broken.yaml", "broken.yaml:2: "),
        ("a:\n\tb: 1\n", "tab.yaml", "tab.yaml:2: "),
        ("a: 1\n---\nb: 2\n", "two.yaml", "two.yaml:2: "),
        ("a: 1\nb: \x00\n", "nul.yaml", "nul.yaml:2: character #x0000 is not allowed"),
        ('{"a": 1,\n  "b": }', "broken.json", "broken.json:2: Expecting value (column 8)"),
        ('{"a": 1,,}', "comma.json", "comma.json:1: Expecting property name"),
    ],
)
def test_syntax_errors_name_file_and_line(text: str, source: str, expected: str) -> None:
    with pytest.raises(DocumentError) as exc:
        load_document(text, source)
    assert str(exc.value).startswith(expected)
    assert "\n" not in str(exc.value)


def test_scalars_resolve_like_yaml_1_2() -> None:
    data = load_document(
        "a: yes\nb: on\nc: 12:30\nd: true\ne: 010\nf: 0x10\ng: 0o17\nh: 1.5\ni: .5\nj: 1_000\n"
        'k: 2026-01-01T00:00:00Z\nl: ~\nm: "03e7"\nn: 03e7\no: False\n',
        "scalars.yaml",
    )
    assert data == {
        "a": "yes",
        "b": "on",
        "c": "12:30",
        "d": True,
        "e": "010",
        "f": 16,
        "g": 15,
        "h": 1.5,
        "i": 0.5,
        "j": 1000,
        "k": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc),
        "l": None,
        "m": "03e7",
        "n": "03e7",
        "o": False,
    }


def test_load_model_validates_into_the_contract() -> None:
    manifest = load_model(DeploymentManifest, MANIFEST, "deploy.yaml")
    assert manifest.name == "shop"
    assert set(manifest.modules) == {"web", "db"}
    assert manifest.modules["web"].ports[0].host == 8080


def test_validation_errors_are_one_line_per_problem_with_field_paths() -> None:
    text = MANIFEST.replace("container: 5001", "container: 0").replace("profile: cpu", "profile: CPU")
    with pytest.raises(DocumentError) as exc:
        load_model(DeploymentManifest, text, "deploy.yaml")
    lines = str(exc.value).splitlines()
    assert len(lines) == 2
    assert exc.value.problems == tuple(lines)
    assert any(line.startswith("deploy.yaml: target.profile: 'CPU' is not a valid name") for line in lines)
    assert (
        "deploy.yaml: modules.web.ports.0.container: Input should be greater than or equal to 1 (line 9)"
        in lines
    )
    assert lines[0].endswith("(line 3)"), "the line of the field in the YAML file"


def test_a_missing_field_names_the_line_of_its_parent() -> None:
    text = MANIFEST.replace("      cpu: localhost:5000/shop/web:1.0\n", "")
    with pytest.raises(DocumentError) as exc:
        load_model(DeploymentManifest, text, "deploy.yaml")
    assert str(exc.value).startswith("deploy.yaml: modules.web.images")
    assert str(exc.value).endswith("(line 6)")


def test_duplicate_module_key_is_caught_before_validation() -> None:
    text = MANIFEST + "  web:\n    images:\n      cpu: localhost:5000/shop/web:2.0\n"
    with pytest.raises(
        DocumentError, match=r"^deploy\.yaml:14: duplicate key 'web' in mapping \(first on line 5\)$"
    ):
        load_model(DeploymentManifest, text, "deploy.yaml")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "m.yaml: the document is empty"),
        ("# only a comment\n", "m.yaml: the document is empty"),
        ("- a\n- b\n", "m.yaml: expected a mapping at the top level, got list"),
        ("just text\n", "m.yaml: expected a mapping at the top level, got str"),
    ],
)
def test_documents_that_are_not_mappings(text: str, expected: str) -> None:
    with pytest.raises(DocumentError) as exc:
        load_model(DeploymentManifest, text, "m.yaml")
    assert str(exc.value) == expected


def test_load_model_file_names_the_path(tmp_path: Path) -> None:
    good = tmp_path / "deploy.yaml"
    good.write_text(MANIFEST)
    assert load_model_file(DeploymentManifest, good).name == "shop"

    bad = tmp_path / "bad.yaml"
    bad.write_text(MANIFEST.replace("name: shop", "name: Shop"))
    with pytest.raises(DocumentError, match=rf"^{re.escape(str(bad))}: name: 'Shop' is not a valid name"):
        load_model_file(DeploymentManifest, bad)


def test_unreadable_files_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(
        DocumentError, match=rf"^{re.escape(str(missing))}: cannot read: No such file or directory$"
    ):
        load_model_file(DeploymentManifest, missing)

    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(DocumentError, match=rf"^{re.escape(str(binary))}: not UTF-8 text \(byte 6\)$"):
        load_model_file(DeploymentManifest, binary)


def test_document_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"^x\.yaml:1: "):
        load_document("a: [", "x.yaml")
