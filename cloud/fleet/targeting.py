"""Which deployments apply on each device, and which image each module gets there. Pure: no I/O.

A deployment selects a device when its ``Target`` matches (ids, tags and profile must all hold).
Among the non-layered deployments that select a device, the highest ``priority`` wins (the
*base*), and among equal priorities the most recently applied one. Two equal-priority deployments
that would give a device *different* content are a conflict the operator must resolve
(``conflicts``); identical content is not a conflict. Layered deployments then apply on top of
the base (``layering.py``); two equal-priority layers that set one module differently conflict too.

A module's image for a device is the one listed for the device's profile or, failing that, for
the first profile of its fallback chain that the module lists (``tensorrt → cuda → cpu``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cloud.fleet.layering import Layered, Provenance, base_provenance, compose, layer_conflicts
from cloud.fleet.placement import (
    DeploymentEntry,
    DeviceInfo,
    TargetingError,
    choose_image,
    device_modules,
    rank,
    selected,
    selected_ids,
)
from cloud.fleet.results import ModulePlacement
from modules.contract import DesiredModule

__all__ = [
    "Assignment",
    "DeploymentEntry",
    "DeviceInfo",
    "Resolution",
    "TargetingError",
    "choose_image",
    "device_modules",
    "placements",
    "rank",
    "resolve",
    "same_content",
    "selected",
    "selected_ids",
    "some_ids",
]


@dataclass(frozen=True)
class Assignment:
    """What applies on a device: its base deployment, the layers on top and the modules they make."""

    base: DeploymentEntry | None
    base_modules: dict[str, DesiredModule]
    layers: tuple[DeploymentEntry, ...]
    """The layers that apply, lowest rank first."""
    layered: Layered

    @property
    def deployment(self) -> DeploymentEntry:
        """The deployment the device's desired state is named for: the base, else the top layer."""
        return self.base if self.base is not None else self.layers[-1]

    @property
    def modules(self) -> dict[str, DesiredModule]:
        """The modules the device must run."""
        return self.layered.modules

    @property
    def provenance(self) -> dict[str, Provenance]:
        """module → where it comes from."""
        return self.layered.provenance

    def involves(self, name: str) -> bool:
        """Whether deployment ``name`` gives this device something (as its base or a layer)."""
        return (self.base is not None and self.base.name == name) or any(e.name == name for e in self.layers)


@dataclass
class Resolution:
    """The winner per device, plus conflicts and placement problems found on the way."""

    assignments: dict[str, Assignment] = field(default_factory=dict)
    conflicts: list[tuple[str, str, str]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def conflict_messages(self, involving: str | None = None) -> list[str]:
        """One line per conflicting pair (only those involving ``involving`` when given)."""
        pairs: dict[tuple[str, str], list[str]] = {}
        for device, a, b in self.conflicts:
            if involving is None or involving in (a, b):
                pairs.setdefault((a, b), []).append(device)
        lines = []
        for (a, b), devices in sorted(pairs.items()):
            lines.append(
                f"deployments {a!r} and {b!r} have the same priority and give different modules to "
                f"{len(devices)} device(s) ({some_ids(devices)}): change one's priority or target"
            )
        return lines


@dataclass(frozen=True)
class _Placement:
    """What resolve decides for every device alike (same profile, tags and id-target memberships)."""

    assignment: Assignment | None
    conflicts: list[tuple[str, str]]
    problems: list[str]


def resolve(
    devices: Iterable[DeviceInfo],
    deployments: Sequence[DeploymentEntry],
    chains: Mapping[str, Sequence[str]],
) -> Resolution:
    """The base deployment, the layers and the modules for every selected device.

    ``chains`` maps a profile to its fallback chain (itself first). Devices that no target tells
    apart (same profile and tags, listed by the same ``device_ids`` targets) are decided once, and
    modules are computed once per (deployment, profile), so large fleets resolve quickly.
    """
    result = Resolution()
    ranked = sorted(deployments, key=rank, reverse=True)
    by_id = [
        (e.name, frozenset(e.manifest.target.device_ids)) for e in ranked if e.manifest.target.device_ids
    ]
    cache: dict[tuple[str, str], dict[str, DesiredModule] | TargetingError] = {}
    placements: dict[tuple[object, ...], _Placement | None] = {}
    problems: dict[str, list[str]] = {}

    def modules_of(entry: DeploymentEntry, profile: str) -> dict[str, DesiredModule] | TargetingError:
        key = (entry.name, profile)
        if key not in cache:
            try:
                cache[key] = device_modules(entry.manifest, profile, chains.get(profile, ()))
            except TargetingError as e:
                cache[key] = e
        return cache[key]

    def place(device: DeviceInfo) -> _Placement | None:
        matching = [e for e in ranked if selected(e, device)]
        bases = [e for e in matching if not e.manifest.layered]
        layers = [e for e in reversed(matching) if e.manifest.layered]
        if not matching:
            return None
        conflicts: list[tuple[str, str]] = layer_conflicts(layers)
        lines: list[str] = []
        base = bases[0] if bases else None
        base_modules: dict[str, DesiredModule] = {}
        if base is not None:
            found = modules_of(base, device.profile)
            if isinstance(found, TargetingError):
                return _Placement(None, [], list(found.problems))
            base_modules = found
            for other in bases[1:]:
                if other.manifest.priority != base.manifest.priority:
                    break
                theirs = modules_of(other, device.profile)
                if isinstance(theirs, TargetingError):
                    lines.extend(theirs.problems)
                elif not same_content(base, base_modules, other, theirs):
                    a, b = sorted((base.name, other.name))
                    conflicts.append((a, b))
        chain = chains.get(device.profile, ())
        layered = (
            compose(base.name if base else None, base_modules, layers, device.profile, chain)
            if layers
            else Layered(base_modules, base_provenance(base.name, base_modules) if base else {})
        )
        lines.extend(f"deployment {n!r}: layer left out: {why}" for n, why in layered.left_out.items())
        applied = tuple(e for e in layers if e.name in layered.applied)
        if base is None and not applied:
            return _Placement(None, conflicts, lines)
        return _Placement(Assignment(base, base_modules, applied, layered), conflicts, lines)

    for device in devices:
        alike = (
            device.profile,
            tuple(sorted(device.tags.items())),
            tuple(name for name, ids in by_id if device.id in ids),
        )
        if alike not in placements:
            placements[alike] = place(device)
        placement = placements[alike]
        if placement is None:
            continue
        for line in placement.problems:
            problems.setdefault(line, []).append(device.id)
        result.conflicts.extend((device.id, a, b) for a, b in placement.conflicts)
        if placement.assignment is not None:
            result.assignments[device.id] = placement.assignment
    for line, ids in sorted(problems.items()):
        result.problems.append(f"{line} ({len(ids)} device(s): {some_ids(ids)})")
    return result


def placements(resolution: Resolution, name: str) -> list[ModulePlacement]:
    """For the devices deployment ``name`` gives something to: each module, where from, on which devices."""
    groups: dict[tuple[str, str], list[str]] = {}
    for device, assignment in sorted(resolution.assignments.items()):
        if assignment.involves(name):
            for module, where in sorted(assignment.provenance.items()):
                groups.setdefault((module, where.describe()), []).append(device)
    return [ModulePlacement(module, origin, devices) for (module, origin), devices in sorted(groups.items())]


def some_ids(ids: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(ids)[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def same_content(
    a: DeploymentEntry,
    a_modules: Mapping[str, DesiredModule],
    b: DeploymentEntry,
    b_modules: Mapping[str, DesiredModule],
) -> bool:
    """Whether two deployments would make a device run the same thing."""
    return (
        dict(a_modules) == dict(b_modules)
        and a.manifest.rollback == b.manifest.rollback
        and a.manifest.health_deadline_s == b.manifest.health_deadline_s
    )
