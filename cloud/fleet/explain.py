"""Why a device runs what it runs: the deployments that select it, the base that wins, the layers
on top, each module's image, the profile it was chosen for and the deployments it comes from.
Pure: no I/O (``Fleet.explain`` loads the inputs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from cloud.fleet.targeting import DeploymentEntry, DeviceInfo, rank, resolve, selected


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
    origin: str
    """The deployment it comes from and what layers replaced or changed, e.g. ``from 'a' (env.X by 'b')``."""


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
    if not matching:
        return Explanation(device.id, device.profile, chain, [], [], "no deployment selects this device")
    resolution = resolve([device], matching, chains)
    assignment = resolution.assignments.get(device.id)
    left_out = assignment.layered.left_out if assignment is not None else {}
    bases = [e for e in matching if not e.manifest.layered]
    candidates = []
    for entry in matching:
        p = entry.manifest.priority
        if entry.manifest.layered:
            why = left_out.get(entry.name)
            outcome = f"layer left out: {why}" if why else "layer: applies on top"
        elif entry is bases[0]:
            outcome = "wins"
        elif p < bases[0].manifest.priority:
            outcome = f"loses: priority {p} < {bases[0].manifest.priority}"
        else:
            outcome = "loses: same priority, applied before the winner"
        candidates.append(Candidate(entry.name, p, entry.applied_at, outcome))
    if assignment is None:
        problem = "; ".join(resolution.problems) or "no deployment gives it a module"
        return Explanation(device.id, device.profile, chain, candidates, [], problem)
    origins = [
        ModuleOrigin(
            name,
            assignment.provenance[name].deployment,
            m.profile,
            m.image,
            "the device's profile"
            if m.profile == device.profile
            else f"fallback: no image for {' → '.join(chain[: chain.index(m.profile)])}",
            assignment.provenance[name].describe(),
        )
        for name, m in sorted(assignment.modules.items())
    ]
    return Explanation(device.id, device.profile, chain, candidates, origins)
