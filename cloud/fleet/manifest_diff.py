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


def replaced_pins(
    stored: DeploymentManifest | None, new: DeploymentManifest, models: list[str], following: dict[str, str]
) -> list[str]:
    """A warning per module whose images ``new`` changes although a model rollout set them.

    ``models``: the model versions the stored deployment records (``deploy set-model``);
    ``following``: module → the model it follows. Re-applying an old file then reverts the model.
    """
    if stored is None or not (models or following):
        return []
    out = []
    for name, spec in sorted(new.modules.items()):
        before = stored.modules.get(name)
        if before is None or before.images == spec.images:
            continue
        why = f"it follows {following[name]}" if name in following else f"it runs {', '.join(models)}"
        out.append(
            f"note: this apply replaces module {name}'s images, which a model rollout set ({why}); "
            "to keep the model, re-run 'edgectl deploy set-model' or put its images in the file"
        )
    return out
