"""Device profiles: load and check ``device-profiles/*.yaml``.

Each file validates against ``DeviceProfile`` (modules/contract.py). On top of that, this module
checks what one file cannot know alone: the file is named after the profile, a fallback names a
profile that exists, and fallbacks never loop. Every error names the file and the field.

Where the profiles are read from, unless a directory is given: ``$EDGE_PROFILES_DIR``, else
``/module/profiles`` (inside module images), else ``device-profiles/`` of this checkout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from modules.contract import DeviceProfile
from modules.documents import DocumentError, load_model_file

PROFILES_DIR_ENV = "EDGE_PROFILES_DIR"
IMAGE_PROFILES_DIR = Path("/module/profiles")
REPO_PROFILES_DIR = Path(__file__).resolve().parent.parent / "device-profiles"
PROFILE_SUFFIXES = (".yaml", ".yml", ".json")

_PINNED_RE = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[A-Za-z0-9_,.\s-]+\])?\s*==\s*[^\s,;]+$")
_REQ_NAME_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


class ProfileError(DocumentError):
    """A profile file is invalid, inconsistent with the others, or does not exist."""


def _normalise(name: str) -> str:
    """PEP 503 project-name normalisation (``PyYAML`` == ``pyyaml``, ``a_b`` == ``a-b``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    m = _REQ_NAME_RE.match(requirement)
    return _normalise(m.group(1)) if m else ""


def default_profiles_dir() -> Path:
    """The directory profiles are read from when none is given (see the module docstring)."""
    env = os.environ.get(PROFILES_DIR_ENV)
    if env:
        path = Path(env)
        if not path.is_dir():
            raise ProfileError(f"{PROFILES_DIR_ENV}={env}: not a directory")
        return path
    if IMAGE_PROFILES_DIR.is_dir():
        return IMAGE_PROFILES_DIR
    if REPO_PROFILES_DIR.is_dir():
        return REPO_PROFILES_DIR
    raise ProfileError(
        f"no device profiles found: set {PROFILES_DIR_ENV}, or provide {IMAGE_PROFILES_DIR} "
        f"or {REPO_PROFILES_DIR}"
    )


def _file_problems(profile: DeviceProfile, path: Path) -> list[str]:
    """Checks of one profile that need its file name or go beyond the contract's schema."""
    problems = []
    if profile.name != path.stem:
        problems.append(f"{path}: name: {profile.name!r} does not match the file name {path.name!r}")
    if profile.base.source == "debootstrap":
        pinned = set()
        for i, req in enumerate(profile.base.python_packages):
            m = _PINNED_RE.match(req.strip())
            if m is None:
                problems.append(
                    f"{path}: base.python_packages.{i}: {req!r} is not pinned "
                    "(write name==version so the base image can be rebuilt identically)"
                )
            else:
                pinned.add(_normalise(m.group("name")))
        if profile.onnxruntime is not None and _normalise(profile.onnxruntime.package) not in pinned:
            problems.append(
                f"{path}: base.python_packages: onnxruntime.package {profile.onnxruntime.package!r} "
                "is not installed in the base image"
            )
        if profile.openvino is not None and _requirement_name(profile.openvino.version) not in pinned:
            problems.append(
                f"{path}: base.python_packages: openvino ({profile.openvino.version!r}) "
                "is not installed in the base image"
            )
    return problems


def load_profile_file(path: str | Path) -> DeviceProfile:
    """Load one profile file and check it on its own (schema, name = file stem, pinned packages)."""
    path = Path(path)
    try:
        profile = load_model_file(DeviceProfile, path)
    except DocumentError as err:
        raise ProfileError(list(err.problems)) from None
    problems = _file_problems(profile, path)
    if problems:
        raise ProfileError(problems)
    return profile


def _fallback_problems(profiles: dict[str, DeviceProfile], files: dict[str, Path]) -> list[str]:
    problems = []
    known = ", ".join(sorted(profiles))
    for name, profile in sorted(profiles.items()):
        if profile.fallback is not None and profile.fallback not in profiles:
            problems.append(f"{files[name]}: fallback: unknown profile {profile.fallback!r} (known: {known})")
    reported: set[frozenset[str]] = set()
    for name in sorted(profiles):
        chain = [name]
        nxt = profiles[name].fallback
        while nxt is not None and nxt in profiles and nxt not in chain:
            chain.append(nxt)
            nxt = profiles[nxt].fallback
        if nxt is None or nxt not in chain:
            continue
        loop = chain[chain.index(nxt) :]
        if frozenset(loop) in reported:
            continue
        reported.add(frozenset(loop))
        start = min(loop)
        ordered = loop[loop.index(start) :] + loop[: loop.index(start)]
        cycle = " -> ".join([*ordered, start])
        problems.append(f"{files[start]}: fallback: fallbacks form a cycle: {cycle}")
    return problems


def load_profiles(directory: str | Path | None = None) -> dict[str, DeviceProfile]:
    """Load every profile in ``directory`` (default: ``default_profiles_dir()``), keyed by name.

    All problems in all files are reported together in one ``ProfileError``.
    """
    folder = Path(directory) if directory is not None else default_profiles_dir()
    if not folder.is_dir():
        raise ProfileError(f"{folder}: not a directory")
    paths = sorted(p for p in folder.iterdir() if p.suffix in PROFILE_SUFFIXES and p.is_file())
    if not paths:
        raise ProfileError(f"{folder}: no device profiles (*.yaml)")
    problems: list[str] = []
    profiles: dict[str, DeviceProfile] = {}
    files: dict[str, Path] = {}
    for path in paths:
        try:
            profile = load_profile_file(path)
        except ProfileError as err:
            problems.extend(err.problems)
            continue
        if profile.name in files:
            problems.append(
                f"{path}: name: profile {profile.name!r} is also defined in {files[profile.name]}"
            )
            continue
        profiles[profile.name] = profile
        files[profile.name] = path
    problems.extend(_fallback_problems(profiles, files))
    if problems:
        raise ProfileError(problems)
    return profiles


def get_profile(name: str, directory: str | Path | None = None) -> DeviceProfile:
    """The profile called ``name``; the error for an unknown name lists the known ones."""
    profiles = load_profiles(directory)
    try:
        return profiles[name]
    except KeyError:
        folder = Path(directory) if directory is not None else default_profiles_dir()
        raise ProfileError(
            f"unknown device profile {name!r} (known in {folder}: {', '.join(sorted(profiles))})"
        ) from None


def fallback_chain(name: str, profiles: dict[str, DeviceProfile]) -> list[str]:
    """``name`` followed by its fallbacks in order, e.g. ``['tensorrt', 'cuda', 'cpu']``."""
    if name not in profiles:
        raise ProfileError(f"unknown device profile {name!r} (known: {', '.join(sorted(profiles))})")
    chain = [name]
    nxt = profiles[name].fallback
    while nxt is not None:
        if nxt in chain:
            raise ProfileError(f"fallbacks form a cycle: {' -> '.join([*chain, nxt])}")
        if nxt not in profiles:
            raise ProfileError(f"profile {chain[-1]!r} falls back to unknown profile {nxt!r}")
        chain.append(nxt)
        nxt = profiles[nxt].fallback
    return chain
