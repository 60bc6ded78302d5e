"""Registered model versions as packaging inputs."""

from __future__ import annotations

from cloud.packaging.context import ModelInput
from cloud.store import Registry
from cloud.store.refs import parse_model_ref


def models_from_registry(registry: Registry, refs: list[str]) -> list[ModelInput]:
    """Each ``NAME[:VERSION]`` as a ModelInput whose files are the registry's blobs."""
    models = []
    for ref in refs:
        name, version = parse_model_ref(ref)
        view = registry.show(name, version)
        files = [(f.path, registry.blobs.path(f.sha256)) for f in view.files]
        models.append(ModelInput(view.name, view.version, files, view.framework))
    return models
