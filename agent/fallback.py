"""Profile fallback on the device: which of a module's images runs here, and when to fall back. Pure.

The cloud sends each module's image for the device's profile and, as ``fallbacks``, the images
of the rest of the profile chain (``tensorrt → cuda → cpu``). The agent runs the first whose
profile its detection finds present (``detect`` rules; ``cpu`` is always present), and moves to
the next when the module fails to start for an accelerator reason: Docker cannot give it the
device (``could not select device driver "nvidia"``, a missing ``/dev`` node), or the scoring
server exits with ``EXIT_INIT_FAILED`` because the backend cannot load the model there. A module
whose profile is ``strict`` never falls back: it keeps failing loudly.

``choose`` is the whole decision; ``effective`` gives the planner the module as it must run now.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

from agent.observed import ObservedModule
from modules.contract import DesiredModule, DesiredState, ProfileImage

EXIT_INIT_FAILED = 3
"""The scoring server's exit status when the model cannot be served as configured (its
``EXIT_INIT_FAILED``; not imported, to keep the scoring server's dependencies off the agent)."""

ACCELERATOR_ERRORS = (
    "could not select device driver",
    "nvidia-container-cli",
    "unknown or invalid runtime name: nvidia",
    "error gathering device information",
    "error creating device nodes",
)
"""Docker Engine answers that mean the accelerator is not usable here (lower case)."""


@dataclass(frozen=True)
class Choice:
    """Which candidate of a module runs (0: the cloud's first choice) and why not an earlier one."""

    candidates: tuple[ProfileImage, ...]
    index: int = 0
    note: str | None = None

    @property
    def current(self) -> ProfileImage:
        """The candidate that runs."""
        return self.candidates[self.index]


def initial_choice(module: DesiredModule, present: Collection[str], strict: Collection[str]) -> Choice:
    """The first candidate whose profile is present on this device (strict profiles: always the first)."""
    candidates = tuple(module.candidates())
    if module.profile in strict or len(candidates) == 1:
        return Choice(candidates)
    for i, candidate in enumerate(candidates):
        if candidate.profile in present:
            if i == 0:
                return Choice(candidates)
            missing = ", ".join(c.profile for c in candidates[:i])
            return Choice(
                candidates, i, f"{missing} not detected on this device: runs the {candidate.profile} image"
            )
    return Choice(candidates)  # nothing detected (not even cpu?): try the cloud's choice and report it


def accelerator_failure(observed: ObservedModule | None, error: str | None) -> str | None:
    """Why the module failed for an accelerator reason, or None when it did not (or not for that)."""
    if error is not None and any(e in error.lower() for e in ACCELERATOR_ERRORS):
        return error.splitlines()[0][:300]
    if (
        observed is not None
        and observed.status in ("exited", "dead")
        and observed.exit_code == EXIT_INIT_FAILED
    ):
        return f"exited with code {EXIT_INIT_FAILED} (the model could not be served on this profile)"
    return None


def fall_back(choice: Choice, why: str) -> Choice | None:
    """The next candidate after a failure of the current one, or None when there is none."""
    if choice.index + 1 >= len(choice.candidates):
        return None
    failed = choice.current.profile
    nxt = choice.candidates[choice.index + 1]
    note = f"{failed} failed to start ({why}): runs the {nxt.profile} image"
    return Choice(
        choice.candidates, choice.index + 1, note if choice.note is None else f"{choice.note}; {note}"
    )


def choose(
    desired: DesiredState | None,
    choices: Mapping[str, Choice],
    observed: Mapping[str, ObservedModule],
    errors: Mapping[str, str],
    present: Collection[str],
    strict: Collection[str],
) -> tuple[dict[str, Choice], list[str]]:
    """Every module's choice after this observation, and a log line per fallback taken.

    A module keeps its choice while its candidates stay the same; a new list starts over from
    ``initial_choice``. A module whose current candidate failed for an accelerator reason moves
    on, unless its profile is strict or it has nothing left to try.
    """
    out: dict[str, Choice] = {}
    lines: list[str] = []
    for name, module in (desired.modules if desired else {}).items():
        candidates = tuple(module.candidates())
        choice = choices.get(name)
        if choice is None or choice.candidates != candidates:
            choice = initial_choice(module, present, strict)
            if choice.note:
                lines.append(f"module {name}: {choice.note}")
        o = observed.get(name)
        runs_current = o is not None and o.image == choice.current.image
        why = accelerator_failure(o if runs_current else None, errors.get(name))
        if why is not None and module.profile not in strict:
            nxt = fall_back(choice, why)
            if nxt is not None:
                lines.append(f"module {name}: {nxt.note}")
                choice = nxt
        out[name] = choice
    return out, lines


def effective(desired: DesiredState | None, choices: Mapping[str, Choice]) -> DesiredState | None:
    """``desired`` with each module's image and profile as chosen (what the planner creates)."""
    if desired is None:
        return None
    modules = {}
    changed = False
    for name, module in desired.modules.items():
        choice = choices.get(name)
        if choice is None or choice.index == 0:
            modules[name] = module
            continue
        current = choice.current
        modules[name] = module.model_copy(
            update={
                "image": current.image,
                "profile": current.profile,
                "fallbacks": list(choice.candidates[choice.index + 1 :]) or None,
            }
        )
        changed = True
    return desired.model_copy(update={"modules": modules}) if changed else desired
