"""Which deployment wins on each device, and which image each module gets there. Pure: no I/O.

A deployment selects a device when its ``Target`` matches (ids, tags and profile must all hold).
Where several select the same device, the highest ``priority`` wins, and among equal priorities
the most recently applied one. Two equal-priority deployments that would give a device
*different* content are a conflict the operator must resolve (``conflicts``); identical content
is not a conflict.

A module's image for a device is the one listed for the device's profile or, failing that, for
the first profile of its fallback chain that the module lists (``tensorrt → cuda → cpu``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from modules.contract import DeploymentManifest, DesiredModule, ModuleSpec


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


@dataclass(frozen=True)
class Assignment:
    """The deployment that wins on a device and the modules the device must run for it."""

    deployment: DeploymentEntry
    modules: dict[str, DesiredModule]


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
                f"{len(devices)} device(s) ({_some(devices)}): change one's priority or target"
            )
        return lines


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


def device_modules(
    manifest: DeploymentManifest, profile: str, chain: Sequence[str]
) -> dict[str, DesiredModule]:
    """The modules a device of ``profile`` must run for ``manifest``, each with its image."""
    out: dict[str, DesiredModule] = {}
    problems: list[str] = []
    for name, spec in manifest.modules.items():
        try:
            used, image = choose_image(name, spec, profile, chain)
        except TargetingError as e:
            problems.extend(f"deployment {manifest.name!r}: {p}" for p in e.problems)
            continue
        settings = spec.model_dump(exclude={"images"})
        out[name] = DesiredModule(**settings, image=image, profile=used)
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


@dataclass(frozen=True)
class _Placement:
    """What resolve decides for every device alike (same profile, tags and id-target memberships)."""

    winner: DeploymentEntry
    modules: dict[str, DesiredModule] | None
    conflicts: list[tuple[str, str]]
    unplaced: list[tuple[str, str]]


def resolve(
    devices: Iterable[DeviceInfo],
    deployments: Sequence[DeploymentEntry],
    chains: Mapping[str, Sequence[str]],
) -> Resolution:
    """The winning deployment and its modules for every selected device.

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
    unplaced: dict[tuple[str, str], list[str]] = {}

    def modules_of(entry: DeploymentEntry, profile: str) -> dict[str, DesiredModule] | None:
        key = (entry.name, profile)
        if key not in cache:
            try:
                cache[key] = device_modules(entry.manifest, profile, chains.get(profile, ()))
            except TargetingError as e:
                cache[key] = e
        found = cache[key]
        return None if isinstance(found, TargetingError) else found

    def place(device: DeviceInfo) -> _Placement | None:
        matching = [e for e in ranked if selected(e, device)]
        if not matching:
            return None
        winner = matching[0]
        modules = modules_of(winner, device.profile)
        if modules is None:
            return _Placement(winner, None, [], [(winner.name, device.profile)])
        conflicts: list[tuple[str, str]] = []
        missing: list[tuple[str, str]] = []
        for other in matching[1:]:
            if other.manifest.priority != winner.manifest.priority:
                break
            theirs = modules_of(other, device.profile)
            if theirs is None:
                missing.append((other.name, device.profile))
            elif not same_content(winner, modules, other, theirs):
                a, b = sorted((winner.name, other.name))
                conflicts.append((a, b))
        return _Placement(winner, modules, conflicts, missing)

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
        for missing in placement.unplaced:
            unplaced.setdefault(missing, []).append(device.id)
        if placement.modules is None:
            continue
        result.conflicts.extend((device.id, a, b) for a, b in placement.conflicts)
        result.assignments[device.id] = Assignment(placement.winner, placement.modules)
    for where, ids in sorted(unplaced.items()):
        error = cache[where]
        assert isinstance(error, TargetingError)
        affected = f"{len(ids)} device(s): {_some(ids)}"
        result.problems.extend(f"{p} ({affected})" for p in error.problems)
    return result


def _some(ids: Sequence[str], limit: int = 5) -> str:
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
