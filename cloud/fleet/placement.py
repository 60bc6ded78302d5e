"""The pieces of placing deployments on devices: a device, a stored deployment, a module's image
for a profile chain, whether a deployment selects a device and how deployments rank. Pure."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from modules.contract import DeploymentManifest, DesiredModule, ModuleSpec, ProfileImage


@dataclass(frozen=True)
class DeviceInfo:
    """What targeting needs to know about a device."""

    id: str
    profile: str
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DeploymentEntry:
    """A stored deployment: its manifest and when it was last applied (newer wins ties)."""

    manifest: DeploymentManifest
    applied_at: datetime

    @property
    def name(self) -> str:
        """The deployment's name."""
        return self.manifest.name


class TargetingError(ValueError):
    """A deployment cannot be placed on a device; ``problems`` holds one line per device/module."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


def choose_image(module: str, spec: ModuleSpec, profile: str, chain: Sequence[str]) -> tuple[str, str]:
    """``(profile used, image)`` for a device of ``profile`` whose fallback chain is ``chain``.

    Raises TargetingError naming the module and the profiles tried when none has an image.
    """
    for candidate in chain or (profile,):
        image = spec.images.get(candidate)
        if image is not None:
            return candidate, image
    tried = " → ".join(chain or (profile,))
    raise TargetingError(
        [
            f"module {module!r} has no image for profile {profile!r} (tried {tried}; "
            f"images given for: {', '.join(sorted(spec.images))})"
        ]
    )


def desired_module(module: str, spec: ModuleSpec, profile: str, chain: Sequence[str]) -> DesiredModule:
    """``spec`` for a device of ``profile``: the chosen image, and the images of the rest of the chain
    as on-device fallbacks (the agent falls back when the accelerator is missing or fails)."""
    used, image = choose_image(module, spec, profile, chain)
    steps = list(chain or (profile,))
    rest = steps[steps.index(used) + 1 :] if used in steps else []
    fallbacks = [ProfileImage(profile=p, image=spec.images[p]) for p in rest if p in spec.images]
    settings = spec.model_dump(exclude={"images"})
    return DesiredModule(**settings, image=image, profile=used, fallbacks=fallbacks or None)


def device_modules(
    manifest: DeploymentManifest, profile: str, chain: Sequence[str]
) -> dict[str, DesiredModule]:
    """The modules a device of ``profile`` must run for ``manifest``, each with its image."""
    out: dict[str, DesiredModule] = {}
    problems: list[str] = []
    for name, spec in manifest.modules.items():
        try:
            out[name] = desired_module(name, spec, profile, chain)
        except TargetingError as e:
            problems.extend(f"deployment {manifest.name!r}: {p}" for p in e.problems)
    if problems:
        raise TargetingError(problems)
    return out


def selected(entry: DeploymentEntry, device: DeviceInfo) -> bool:
    """Whether ``entry`` targets ``device``."""
    return entry.manifest.target.matches(device.id, dict(device.tags), device.profile)


def selected_ids(entry: DeploymentEntry, devices: Iterable[DeviceInfo]) -> list[str]:
    """The ids of the ``devices`` that ``entry`` targets, decided once per profile and tags."""
    listed = frozenset(entry.manifest.target.device_ids)
    decided: dict[tuple[str, tuple[tuple[str, str], ...]], bool] = {}
    out = []
    for device in devices:
        if listed and device.id not in listed:
            continue
        alike = (device.profile, tuple(sorted(device.tags.items())))
        if alike not in decided:
            decided[alike] = selected(entry, device)
        if decided[alike]:
            out.append(device.id)
    return out


def rank(entry: DeploymentEntry) -> tuple[int, datetime, str]:
    """How deployments compete for a device: higher priority, then the later apply, then the name."""
    return (entry.manifest.priority, entry.applied_at, entry.name)
