"""Why a device runs what it runs: the deployments that select it, the winner, each module's
image and the profile it was chosen for. Pure: no I/O (``Fleet.explain`` loads the inputs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from cloud.fleet.targeting import DeploymentEntry, DeviceInfo, TargetingError, device_modules, rank, selected


@dataclass(frozen=True)
class Candidate:
    """A deployment that selects the device, in the order they compete (the first wins)."""

    deployment: str
    priority: int
    applied_at: datetime
    outcome: str
    """``wins``, or why it does not: a lower priority, an older apply at equal priority."""


@dataclass(frozen=True)
class ModuleOrigin:
    """One module the device runs: from which deployment, for which profile, which image."""

    module: str
    deployment: str
    profile: str
    image: str
    note: str
    """Why this profile's image: the device's own, or the fallback taken."""


@dataclass(frozen=True)
class Explanation:
    """What ``edgectl deploy explain DEVICE`` shows."""

    device: str
    profile: str
    chain: list[str]
    candidates: list[Candidate]
    modules: list[ModuleOrigin]
    problem: str | None = None
    """Why the winner gives the device nothing (e.g. no image for its profile chain)."""


def explain(
    device: DeviceInfo, deployments: Sequence[DeploymentEntry], chains: Mapping[str, Sequence[str]]
) -> Explanation:
    """The explanation for ``device`` among ``deployments`` (as ``resolve`` decides it)."""
    chain = list(chains.get(device.profile, ()) or (device.profile,))
    matching = sorted((e for e in deployments if selected(e, device)), key=rank, reverse=True)
    candidates = []
    for i, entry in enumerate(matching):
        if i == 0:
            outcome = "wins"
        elif entry.manifest.priority < matching[0].manifest.priority:
            outcome = f"loses: priority {entry.manifest.priority} < {matching[0].manifest.priority}"
        else:
            outcome = "loses: same priority, applied before the winner"
        candidates.append(Candidate(entry.name, entry.manifest.priority, entry.applied_at, outcome))
    if not matching:
        return Explanation(device.id, device.profile, chain, [], [], "no deployment selects this device")
    winner = matching[0]
    try:
        modules = device_modules(winner.manifest, device.profile, chain)
    except TargetingError as e:
        return Explanation(device.id, device.profile, chain, candidates, [], str(e))
    origins = [
        ModuleOrigin(
            name,
            winner.name,
            m.profile,
            m.image,
            "the device's profile"
            if m.profile == device.profile
            else f"fallback: no image for {' → '.join(chain[: chain.index(m.profile)])}",
        )
        for name, m in sorted(modules.items())
    ]
    return Explanation(device.id, device.profile, chain, candidates, origins)
