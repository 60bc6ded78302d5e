"""Layered deployments: a device's modules built from its base deployment and the layers on top. Pure.

A *layered* deployment (``layered: true``) does not compete with the others for a device: it
applies on top of what the device gets from its base deployment (the highest-ranked non-layered
one that selects it) and from the layers ranked below it. Its ``modules`` add a module or replace
one of the same name; its ``overrides`` change settings of a module from below (env key by key,
any other field given replaces). Layers apply lowest rank first, so per module the highest
priority wins. A layer that cannot apply on a device (no image for its profile, a host port
clash, an override of a module nothing below gives) is left out there, with the reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cloud.fleet.placement import DeploymentEntry, TargetingError, desired_module
from modules.contract import DesiredModule, host_ports_unique


@dataclass(frozen=True)
class Provenance:
    """Where a device's module comes from."""

    deployment: str
    """The deployment whose module (and image) the device runs."""
    replaced: tuple[str, ...] = ()
    """Deployments below it whose module of the same name it replaced, lowest first."""
    changed_by: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """``(layer, fields it changed)`` for every layer that overrode its settings, in order."""

    def describe(self) -> str:
        """One line: ``from 'a' (replaces 'b'; env.X by 'c')``."""
        notes = [f"replaces {', '.join(repr(r) for r in self.replaced)}"] if self.replaced else []
        notes += [f"{', '.join(fields)} by {layer!r}" for layer, fields in self.changed_by]
        return f"from {self.deployment!r}" + (f" ({'; '.join(notes)})" if notes else "")


@dataclass(frozen=True)
class Layered:
    """A device's modules after its layers, with the provenance of each and the layers left out."""

    modules: dict[str, DesiredModule]
    provenance: dict[str, Provenance]
    applied: tuple[str, ...] = ()
    """The layers that apply, lowest first."""
    left_out: dict[str, str] = field(default_factory=dict)
    """layer → why it does not apply on this device."""


def base_provenance(deployment: str, modules: Mapping[str, DesiredModule]) -> dict[str, Provenance]:
    """Every module from ``deployment``, changed by nothing."""
    return {name: Provenance(deployment) for name in modules}


def compose(
    base: str | None,
    base_modules: Mapping[str, DesiredModule],
    layers: Sequence[DeploymentEntry],
    profile: str,
    chain: Sequence[str],
) -> Layered:
    """Apply ``layers`` (lowest rank first) to ``base_modules`` for a device of ``profile``."""
    modules = dict(base_modules)
    provenance = base_provenance(base, modules) if base is not None else {}
    applied: list[str] = []
    left_out: dict[str, str] = {}
    for layer in layers:
        try:
            modules, provenance = _apply_layer(layer, modules, provenance, profile, chain)
        except TargetingError as e:
            left_out[layer.name] = "; ".join(e.problems)
            continue
        applied.append(layer.name)
    return Layered(modules, provenance, tuple(applied), left_out)


def _apply_layer(
    layer: DeploymentEntry,
    modules: Mapping[str, DesiredModule],
    provenance: Mapping[str, Provenance],
    profile: str,
    chain: Sequence[str],
) -> tuple[dict[str, DesiredModule], dict[str, Provenance]]:
    out = dict(modules)
    where = dict(provenance)
    problems: list[str] = []
    manifest = layer.manifest
    for name, spec in manifest.modules.items():
        try:
            out[name] = desired_module(name, spec, profile, chain)
        except TargetingError as e:
            problems.extend(e.problems)
            continue
        before = where.get(name)
        replaced = (*before.replaced, before.deployment) if before is not None else ()
        where[name] = Provenance(layer.name, replaced)
    for name, override in manifest.overrides.items():
        current = out.get(name)
        if current is None:
            problems.append(f"overrides module {name!r}, which no deployment below it gives this device")
            continue
        try:
            out[name] = DesiredModule.model_validate(override.apply(current.model_dump()))
        except ValueError as e:
            problems.append(f"override of module {name!r}: {e}")
            continue
        before = where[name]
        where[name] = Provenance(
            before.deployment, before.replaced, (*before.changed_by, (layer.name, tuple(override.changes())))
        )
    if not problems:
        try:
            host_ports_unique(dict(out))
        except ValueError as e:
            problems.append(str(e))
    if problems:
        raise TargetingError(problems)
    return out, where


def touches(entry: DeploymentEntry) -> dict[str, object]:
    """What a layer sets per module name (a module spec or an override), to find conflicts."""
    return {**entry.manifest.modules, **entry.manifest.overrides}


def layer_conflicts(layers: Sequence[DeploymentEntry]) -> list[tuple[str, str]]:
    """Pairs of equal-priority layers that set the same module differently (sorted names)."""
    out = []
    for i, a in enumerate(layers):
        for b in layers[i + 1 :]:
            if a.manifest.priority != b.manifest.priority:
                continue
            mine, theirs = touches(a), touches(b)
            if any(mine[n] != theirs[n] for n in set(mine) & set(theirs)):
                x, y = sorted((a.name, b.name))
                out.append((x, y))
    return out
