"""What an apply changes: a unified diff between two deployment manifests. Pure: no I/O."""

from __future__ import annotations

import difflib

import yaml

from modules.contract import DeploymentManifest


def manifest_diff(stored: DeploymentManifest | None, new: DeploymentManifest, source: str) -> list[str]:
    """A unified diff from the stored manifest to ``new`` (defaults spelt out); empty when they are
    equal or nothing is stored yet.

    It shows what an apply changes, including pins the stored manifest got from ``deploy set-model``
    that re-applying an older file would revert.
    """
    if stored is None:  # a new deployment: nothing to compare with
        return []

    def lines(m: DeploymentManifest) -> list[str]:
        document = m.model_dump(mode="json")
        return yaml.safe_dump(document, sort_keys=False, default_flow_style=False).splitlines()

    old, current = lines(stored), lines(new)
    if old == current:
        return []
    return list(difflib.unified_diff(old, current, f"deployment {new.name} (stored)", source, lineterm=""))
