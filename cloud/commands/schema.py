"""``edgectl schema``: the JSON Schema of the documents operators write.

``deployment`` and ``inference-config`` are generated from the pydantic models the cloud reads
them with. ``agent-config`` is the agent's own model: the cloud may not import the agent, so it
prints ``cloud/agent_config.schema.json``, which ``edge-agent schema`` generates and a test keeps
equal to what the agent reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cloud.commands.base import CliError, add_command
from cloud.inference_config import InferenceConfig
from modules.contract import DeploymentManifest

AGENT_SCHEMA_FILE = Path(__file__).resolve().parent.parent / "agent_config.schema.json"


def _agent_config() -> dict[str, Any]:
    try:
        return dict(json.loads(AGENT_SCHEMA_FILE.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise CliError(f"cannot read the agent config schema {AGENT_SCHEMA_FILE}: {e}", 1) from e


SCHEMAS: dict[str, tuple[str, Callable[[], dict[str, Any]]]] = {
    "deployment": ("a deployment manifest (edgectl deploy apply -f)", DeploymentManifest.model_json_schema),
    "inference-config": ("an inference config (edgectl package --config)", InferenceConfig.model_json_schema),
    "agent-config": ("the agent's agent.yaml (edge-agent --config)", _agent_config),
}


def schema_of(kind: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of ``kind``, with ``$schema`` and a title."""
    describe, make = SCHEMAS[kind]
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **make(), "description": describe}


def cmd_schema(args: argparse.Namespace) -> int:
    """Print (or write) one schema."""
    text = json.dumps(schema_of(args.kind), indent=2, sort_keys=False) + "\n"
    if args.out:
        out = Path(args.out)
        try:
            out.write_text(text, encoding="utf-8")
        except OSError as e:
            raise CliError(f"--out {out}: {e.strerror or e}", 1) from e
        print(f"wrote the {args.kind} schema to {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the top-level ``schema`` command."""
    p = add_command(
        subparsers,
        "schema",
        cmd_schema,
        help="print the JSON Schema of a deployment, an inference config or an agent config",
        description="Print the JSON Schema of a document you write: "
        + "; ".join(f"{k}: {d}" for k, (d, _) in SCHEMAS.items())
        + ". Editors (VS Code's YAML extension, JetBrains) validate and complete YAML files with it. "
        "docs/manifests.md explains every field.",
        examples="  edgectl schema deployment > deployment.schema.json\n"
        "  edgectl schema inference-config --out inference-config.schema.json\n"
        "  # in deployment.yaml, for editors: # yaml-language-server: $schema=deployment.schema.json",
        json_output=False,
    )
    p.add_argument("kind", choices=sorted(SCHEMAS), help="which document")
    p.add_argument("--out", metavar="FILE", help="write the schema to FILE instead of stdout")
