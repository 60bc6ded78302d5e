"""``edgectl schema``: JSON Schemas generated from the models, and the example files validate against them."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from agent.cli import config_schema
from agent.config import AgentConfig
from cloud.cli import main
from cloud.commands.schema import AGENT_SCHEMA_FILE, schema_of
from cloud.inference_config import InferenceConfig
from modules.contract import DeploymentManifest
from modules.documents import DocumentError, load_model_file

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FILES = {
    "deployment": "deployment.yaml",
    "inference-config": "inference-config.yaml",
    "agent-config": "agent.yaml",
}
EXAMPLE_FILES = [*FILES.items(), ("deployment", "layer.yaml")]
MODELS = {"deployment": DeploymentManifest, "inference-config": InferenceConfig, "agent-config": AgentConfig}


def test_the_shipped_agent_schema_is_what_the_agent_reads() -> None:
    shipped = json.loads(AGENT_SCHEMA_FILE.read_text())
    assert shipped == config_schema(), (
        "cloud/agent_config.schema.json is stale: regenerate it with "
        "'python -m agent schema > cloud/agent_config.schema.json'"
    )


@pytest.mark.parametrize(("kind", "name"), EXAMPLE_FILES)
def test_each_example_validates_against_its_schema_and_its_model(kind: str, name: str) -> None:
    path = EXAMPLES / name
    document = yaml.safe_load(path.read_text())
    jsonschema.Draft202012Validator(schema_of(kind)).validate(document)
    load_model_file(MODELS[kind], path)


@pytest.mark.parametrize("kind", sorted(FILES))
def test_the_schema_rejects_what_the_model_rejects(kind: str) -> None:
    document = yaml.safe_load((EXAMPLES / FILES[kind]).read_text())
    document["no_such_field"] = 1
    with pytest.raises(jsonschema.ValidationError, match="no_such_field"):
        jsonschema.Draft202012Validator(schema_of(kind)).validate(document)


def test_edgectl_schema_prints_and_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema", "deployment"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["title"] == "DeploymentManifest"
    assert printed["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert "batching" in printed["$defs"]["ModuleSpec"]["properties"]
    out = tmp_path / "agent.schema.json"
    assert main(["schema", "agent-config", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["title"] == "AgentConfig"
    assert main(["schema", "manifest"]) == 2


def test_a_bad_example_names_the_field_and_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "deployment.yaml"
    bad.write_text(
        (EXAMPLES / "deployment.yaml").read_text().replace("max_batch_size: 16", "max_batch_size: 0")
    )
    with pytest.raises(DocumentError) as exc:
        load_model_file(DeploymentManifest, bad)
    line = next(n for n, text in enumerate(bad.read_text().splitlines(), 1) if "max_batch_size" in text)
    field = "modules.digits.batching.max_batch_size"
    assert str(exc.value) == f"{bad}: {field}: Input should be greater than or equal to 1 (line {line})"


def _fields(schema: dict[str, object]) -> set[str]:
    names: set[str] = set(schema.get("properties", {}))  # type: ignore[arg-type]
    for definition in schema.get("$defs", {}).values():  # type: ignore[attr-defined]
        names |= set(definition.get("properties", {}))
    return names


@pytest.mark.parametrize("kind", sorted(FILES))
def test_docs_manifests_explains_every_field(kind: str) -> None:
    docs = (EXAMPLES.parent / "docs" / "manifests.md").read_text()
    missing = sorted(f for f in _fields(schema_of(kind)) if f"`{f}`" not in docs)
    assert not missing, f"docs/manifests.md does not explain {kind} field(s) {missing}"
