"""Build a slim Debian root file system for a base image: debootstrap, strip, Python deps, check.

Needs root (debootstrap, chroot) and the Debian mirror; no container registry.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from cloud.packaging.errors import PackagingError, os_error
from cloud.packaging.progress import Progress
from cloud.packaging.pydeps import PYTHON_VERSION, pip_install, requirement_name

SUITE = "bookworm"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
MIRROR_ENV = "EDGE_DEBIAN_MIRROR"


def site_packages(python: str = PYTHON_VERSION) -> str:
    """Where an image keeps Python deps: ``/usr/local/lib/python3.X/dist-packages`` (on python3's path)."""
    return f"/usr/local/lib/python{python}/dist-packages"


_DPKG_SLIM = """\
# edgedeploy: keep documentation and translations out of this image
path-exclude=/usr/share/doc/*
path-include=/usr/share/doc/*/copyright
path-exclude=/usr/share/man/*
path-exclude=/usr/share/info/*
path-exclude=/usr/share/locale/*
path-include=/usr/share/locale/locale.alias
path-exclude=/usr/share/lintian/*
"""
_APT_SLIM = 'APT::Keep-Downloaded-Packages "false";\nAcquire::Languages "none";\n'
_QUIET_LINE = re.compile(r"^I: (Retrieving|Validating|Unpacking|Configuring|Extracting) \S+\.\.\.$")
_IMPORT_NAMES = {"pyyaml": "yaml", "onnxruntime-gpu": "onnxruntime", "onnxruntime-openvino": "onnxruntime"}
_CHECKED = ("aiohttp", "pydantic", "pyyaml", "numpy", "orjson", "onnxruntime", "onnxruntime-gpu", "openvino")


def mirror() -> str:
    """The Debian mirror: ``$EDGE_DEBIAN_MIRROR`` or deb.debian.org."""
    return os.environ.get(MIRROR_ENV, DEFAULT_MIRROR)


def _run(cmd: Sequence[str], what: str, progress: Progress, log: Path) -> None:
    """Run ``cmd``, appending its output to ``log`` and relaying the interesting lines."""
    progress.step(f"{what}: {' '.join(cmd[:4])} ...")
    lines: list[str] = []
    try:
        with (
            open(log, "a") as fh,
            subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
            ) as proc,
        ):
            assert proc.stdout is not None
            for line in proc.stdout:
                fh.write(line)
                line = line.rstrip()
                lines.append(line)
                if line and not _QUIET_LINE.match(line):
                    progress.step(f"  {line}")
            code = proc.wait()
    except OSError as exc:
        raise os_error(exc, what) from None
    if code != 0:
        text = "\n".join(lines)
        if "No space left on device" in text:
            raise PackagingError(f"{what} failed: no space left on device (log: {log})")
        last = next((ln for ln in reversed(lines) if ln.strip()), "(no output)")
        raise PackagingError(f"{what} failed with exit code {code}: {last.strip()} (log: {log})")


def unmount_below(root: Path) -> None:
    """Lazily unmount anything mounted under ``root`` (debootstrap leaves /proc on failure)."""
    prefix = str(root.resolve()) + "/"
    try:
        with open("/proc/mounts") as fh:
            points = [line.split()[1] for line in fh]
    except OSError:
        return
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def strip_rootfs(root: Path) -> None:
    """Remove documentation, translations, apt lists and caches; keep copyright files."""
    doc = root / "usr/share/doc"
    if doc.is_dir():
        for pkg in doc.iterdir():
            if pkg.is_dir() and not pkg.is_symlink():
                for item in pkg.iterdir():
                    if item.name != "copyright":
                        _remove(item)
            else:
                _remove(pkg)
    for rel in ("usr/share/man", "usr/share/info", "usr/share/lintian", "usr/share/linda"):
        _clear(root / rel)
    locale = root / "usr/share/locale"
    if locale.is_dir():
        for item in locale.iterdir():
            if item.name != "locale.alias":
                _remove(item)
    for rel in (
        "var/lib/apt/lists",
        "var/cache/apt",
        "var/cache/debconf",
        "var/log",
        "tmp",
        "var/tmp",
        "root",
    ):
        _clear(root / rel, keep=("lock", "partial", "config.dat", "templates.dat", "passwords.dat"))
    for old in (root / "var/lib/dpkg").glob("*-old"):
        _remove(old)
    (root / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/dpkg/dpkg.cfg.d/01-edgedeploy-slim").write_text(_DPKG_SLIM)
    (root / "etc/apt/apt.conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/apt/apt.conf.d/01-edgedeploy-slim").write_text(_APT_SLIM)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _clear(folder: Path, keep: Sequence[str] = ()) -> None:
    """Empty ``folder`` (recursively), keeping entries named in ``keep``."""
    if not folder.is_dir():
        return
    for item in folder.iterdir():
        if item.name in keep:
            if item.is_dir() and not item.is_symlink():
                _clear(item, keep)
            continue
        _remove(item)


def build_rootfs(
    root: Path,
    apt_packages: Sequence[str],
    requirements: Sequence[str],
    progress: Progress,
    log: Path,
    deb_cache: Path | None = None,
    python: str = PYTHON_VERSION,
) -> dict[str, str]:
    """Create the root file system at ``root``; returns ``{distribution: version}`` of its Python deps.

    ``deb_cache`` keeps downloaded .deb files between builds (debootstrap ``--cache-dir``).
    """
    if os.geteuid() != 0:
        raise PackagingError("building a base image needs root (debootstrap and chroot): run as root")
    if python != PYTHON_VERSION:
        raise PackagingError(
            f"base.python is {python}, but debootstrap bases are Debian {SUITE} with Python {PYTHON_VERSION}"
        )
    if shutil.which("debootstrap") is None:
        raise PackagingError("debootstrap is not installed: apt-get install debootstrap")
    include = ",".join(dict.fromkeys(["python3", *apt_packages]))
    cmd = ["debootstrap", "--variant=minbase", f"--include={include}", "--components=main"]
    if deb_cache is not None:
        deb_cache.mkdir(parents=True, exist_ok=True)
        cmd.append(f"--cache-dir={deb_cache}")
    try:
        _run(
            [*cmd, SUITE, str(root), mirror()],
            f"debootstrap {SUITE} ({include})",
            progress,
            log,
        )
    finally:
        unmount_below(root)
    progress.step("stripping documentation, translations and caches")
    strip_rootfs(root)
    site = site_packages(python)
    installed = pip_install(requirements, root / site.lstrip("/"), progress, python=python)
    progress.step(f"installed {len(installed)} python distributions into {site}")
    _run(
        [
            "chroot",
            str(root),
            "/usr/bin/python3",
            "-m",
            "compileall",
            "-q",
            "--invalidation-mode",
            "unchecked-hash",
            site,
        ],
        "compiling python packages",
        progress,
        log,
    )
    wanted = {requirement_name(r) for r in requirements}
    modules = sorted({_IMPORT_NAMES.get(n, n) for n in _CHECKED if n in wanted})
    _run(
        ["chroot", str(root), "/usr/bin/python3", "-c", f"import {', '.join(modules)}; print('imports ok')"],
        "checking the python runtime in the image",
        progress,
        log,
    )
    return installed
