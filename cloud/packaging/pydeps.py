"""Python dependencies for images, resolved on the build host and copied in.

Containers on a build host may not reach PyPI (or trust its TLS proxy), so ``pip install --target``
runs here, for the image's Python (CPython 3.11 on manylinux x86_64 by default), wheels only.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from cloud.packaging.errors import InputError, PackagingError, os_error
from cloud.packaging.progress import Progress
from modules.contract import DeviceProfile, canonical_json

RUNTIME_REQUIREMENTS: tuple[str, ...] = (
    "aiohttp>=3.9",
    "pydantic>=2.6",
    "PyYAML>=6.0",
    "numpy>=1.24",
    "onnxruntime>=1.17",
    "orjson>=3.9",
    "uvloop>=0.19; sys_platform != 'win32'",
)
"""What the scoring runtime needs in every image: pyproject.toml's ``[project] dependencies``."""

PYTHON_VERSION = "3.11"
"""The Python of Debian bookworm (the default of ``base.python`` in profiles)."""

UNUSED_FILES: tuple[str, ...] = ("onnxruntime/capi/libonnxruntime.so.*",)
"""Files wheels ship that a module never loads: onnxruntime's C API library (29 MB), which its
Python binding does not link against (the binding carries its own copy of the runtime)."""

_NAME_RE = re.compile(r"^\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")
_PLATFORMS = [f"manylinux_2_{minor}_x86_64" for minor in range(36, 16, -1)] + [
    "manylinux2014_x86_64",
    "manylinux2010_x86_64",
    "manylinux1_x86_64",
]


def canonical_name(name: str) -> str:
    """PEP 503 normalised distribution name: ``PyYAML`` → ``pyyaml``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    """The distribution a requirement line names; raises InputError when there is none."""
    m = _NAME_RE.match(requirement)
    if not m or requirement.strip().startswith(("-", "/", ".")) or "://" in requirement:
        raise InputError(
            f"{requirement!r} is not a pip requirement like 'name>=1.0' "
            "(options, paths and URLs are not allowed)"
        )
    return canonical_name(m.group(1))


def merge_requirements(*groups: Iterable[str]) -> list[str]:
    """Requirement lines with one line per distribution; a later group's line replaces an earlier one."""
    merged: dict[str, str] = {}
    for group in groups:
        for req in group:
            req = req.strip()
            if req:
                merged[requirement_name(req)] = req
    return [merged[k] for k in sorted(merged)]


def profile_requirements(profile: DeviceProfile) -> list[str]:
    """What a profile's image must hold: the profile's Python packages, plus what the runtime needs.

    The profile's own lines win; onnxruntime is left to the profile when it names another build
    (``onnxruntime-gpu``). The backend package (openvino) comes from the profile's list or, for
    vendor images, from the vendor image itself.
    """
    runtime = list(RUNTIME_REQUIREMENTS)
    if profile.onnxruntime is not None and canonical_name(profile.onnxruntime.package) != "onnxruntime":
        runtime = [r for r in runtime if requirement_name(r) != "onnxruntime"]
    return merge_requirements(runtime, profile.base.python_packages)


def installed_versions(target: Path) -> dict[str, str]:
    """``{canonical name: version}`` of the distributions installed in ``target`` (from *.dist-info)."""
    found: dict[str, str] = {}
    if not target.is_dir():
        return found
    for meta in sorted(target.glob("*.dist-info/METADATA")):
        name = version = ""
        with open(meta, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("Name:"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("Version:"):
                    version = line.split(":", 1)[1].strip()
                elif not line.strip():
                    break
        if name and version:
            found[canonical_name(name)] = version
    return found


def requirements_key(requirements: Iterable[str], constraints: Mapping[str, str], python: str) -> str:
    """A hash naming one resolution: the requirement lines, constraints and target Python."""
    doc = {
        "requirements": sorted(requirements),
        "constraints": dict(sorted(constraints.items())),
        "python": python,
        "platforms": _PLATFORMS,
    }
    return hashlib.sha256(canonical_json(doc)).hexdigest()


def pip_install(
    requirements: Iterable[str],
    target: Path,
    progress: Progress,
    *,
    python: str = PYTHON_VERSION,
    constraints: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Install ``requirements`` (wheels only) for the image's Python into ``target``; returns the result.

    ``constraints`` pins distributions to the versions a base image already has, so that
    ``prune_present`` can drop them again. Raises InputError with pip's own last error line.
    """
    reqs = list(requirements)
    target.mkdir(parents=True, exist_ok=True)
    if not reqs:
        return {}
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--target",
        str(target),
        "--no-compile",
        "--no-warn-conflicts",
    ]
    cmd += ["--only-binary=:all:", "--python-version", python, "--implementation", "cp"]
    cmd += ["--abi", "cp" + python.replace(".", "")]
    for platform in _PLATFORMS:
        cmd += ["--platform", platform]
    cmd += ["--disable-pip-version-check", "--no-input", "--quiet"]
    constraint_file = target.parent / f".{target.name}.constraints.txt"
    if constraints:
        constraint_file.write_text("".join(f"{n}=={v}\n" for n, v in sorted(constraints.items())))
        cmd += ["--constraint", str(constraint_file)]
    progress.step(f"resolving python packages on this host: {', '.join(reqs)}")
    env = {**os.environ, "PIP_ROOT_USER_ACTION": "ignore"}
    try:
        proc = subprocess.run([*cmd, *reqs], capture_output=True, text=True, env=env, check=False)
    except OSError as exc:
        raise os_error(exc, "running pip") from None
    finally:
        constraint_file.unlink(missing_ok=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING")]
        errors = [ln for ln in lines if ln.startswith("ERROR")] or lines or ["(no output)"]
        if "No space left on device" in proc.stderr:
            raise PackagingError(f"no space left on device while installing python packages into {target}")
        raise InputError(f"pip could not install {', '.join(reqs)} for Python {python}: {errors[-1]}")
    tidy_site_packages(target)
    return installed_versions(target)


def tidy_site_packages(target: Path) -> None:
    """Drop what an image never runs: scripts, caches, test suites, debug symbols, unused libraries."""
    shutil.rmtree(target / "bin", ignore_errors=True)
    for path in sorted(target.rglob("*"), reverse=True):
        if (
            path.is_dir()
            and not path.is_symlink()
            and path.parent != target
            and path.name in ("tests", "__pycache__")
        ):
            shutil.rmtree(path, ignore_errors=True)
    for pattern in UNUSED_FILES:
        for path in target.glob(pattern):
            path.unlink()
    _strip_debug_info(target)


def _strip_debug_info(target: Path) -> None:
    """Remove debug sections from extension modules built with them (uvloop: 13 MB → 2 MB).

    Only files that carry ``.debug_info``, have no RPATH/RUNPATH and do not sit in a ``*.libs``
    folder: auditwheel rewrites those with patchelf, and binutils' strip corrupts such files.
    """
    strip, readelf = shutil.which("strip"), shutil.which("readelf")
    if strip is None or readelf is None:
        return
    for lib in sorted(target.rglob("*.so*")):
        if not lib.is_file() or lib.is_symlink() or any(part.endswith(".libs") for part in lib.parts):
            continue
        info = subprocess.run(
            [readelf, "-S", "-d", "-W", str(lib)], capture_output=True, text=True, check=False
        )
        if (
            info.returncode == 0
            and ".debug_info" in info.stdout
            and not re.search(r"\((RPATH|RUNPATH)\)", info.stdout)
        ):
            subprocess.run([strip, "--strip-debug", str(lib)], capture_output=True, check=False)


def prune_present(target: Path, present: Mapping[str, str]) -> list[str]:
    """Remove distributions the base already has at the same version (using their RECORD files)."""
    removed = []
    for record in sorted(target.glob("*.dist-info/RECORD")):
        dist_info = record.parent
        name, _, version = dist_info.name.removesuffix(".dist-info").partition("-")
        if present.get(canonical_name(name)) != version:
            continue
        for line in record.read_text(encoding="utf-8").splitlines():
            rel = line.split(",", 1)[0]
            path = (target / rel).resolve()
            if rel and path.is_relative_to(target.resolve()) and path.is_file():
                path.unlink()
        shutil.rmtree(dist_info, ignore_errors=True)
        removed.append(canonical_name(name))
    for path in sorted(target.rglob("*"), reverse=True):
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
    return removed
