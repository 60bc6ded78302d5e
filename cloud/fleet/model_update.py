"""Model updates of a deployment: swap one module's images and the model versions it records. Pure.

``edgectl deploy set-model`` packages the new model version into the module's images (one per
profile the module lists) and applies the deployment with those images; these helpers build the
new manifest and the new model list.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from cloud.store.errors import InvalidInputError
from modules.contract import DeploymentManifest


def with_module_images(
    manifest: DeploymentManifest, module: str, images: Mapping[str, str]
) -> DeploymentManifest:
    """A copy of ``manifest`` whose ``module`` uses ``images`` (profile → image) for those profiles.

    Raises InvalidInputError when the module is missing or an image is for a profile the module
    does not list (it would widen where the module runs).
    """
    spec = manifest.modules.get(module)
    if spec is None:
        raise InvalidInputError(
            f"deployment {manifest.name!r} has no module {module!r} "
            f"(modules: {', '.join(sorted(manifest.modules))})"
        )
    extra = sorted(set(images) - set(spec.images))
    if extra:
        raise InvalidInputError(
            f"deployment {manifest.name!r}, module {module!r}: no image is listed for profile(s) "
            f"{', '.join(extra)}"
        )
    doc = manifest.model_dump(mode="json")
    doc["modules"][module]["images"].update(images)
    return DeploymentManifest.model_validate(doc)


def with_model(current: Iterable[str], name: str, version: int) -> list[tuple[str, int]]:
    """The ``(name, version)`` list of ``current`` (``name:version`` strings) with ``name`` at ``version``."""
    out = []
    for ref in current:
        other, _, number = ref.partition(":")
        if other != name:
            out.append((other, int(number)))
    out.append((name, version))
    return sorted(out)
