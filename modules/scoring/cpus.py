"""How many CPUs this process may really use: the affinity mask, capped by the cgroup CPU quota.

``os.cpu_count()`` reports the host's CPUs, and inference runtimes size their thread pools from it;
inside a container limited to 2 CPUs on a 16-core host that means 16 threads fighting over 2 CPUs'
worth of time. ``allowed_cpus`` reads what actually applies:

- the affinity mask (``os.sched_getaffinity``; ``docker run --cpuset-cpus``),
- the CFS quota of the process's cgroup and of every ancestor that is visible: cgroup v2
  ``cpu.max`` (``"max 100000"`` or ``"200000 100000"``) or cgroup v1 ``cpu.cfs_quota_us`` /
  ``cpu.cfs_period_us`` (``docker run --cpus``), rounded up,

and ``SCORING_THREADS`` overrides both. All files are read under ``root`` so tests can fake them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath

ENV_OVERRIDE = "SCORING_THREADS"
_V1_CPU_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")


def allowed_cpus(
    *,
    root: Path | str = "/",
    environ: Mapping[str, str] | None = None,
    affinity: Iterable[int] | None = None,
) -> int:
    """The number of CPUs this process may use (at least 1).

    ``root`` is the filesystem root holding ``proc/self/cgroup`` and ``sys/fs/cgroup``;
    ``environ`` defaults to ``os.environ`` and ``affinity`` to ``os.sched_getaffinity(0)``.
    Raises ValueError when ``SCORING_THREADS`` is set to anything but a positive integer.
    """
    env = os.environ if environ is None else environ
    override = env.get(ENV_OVERRIDE, "").strip()
    if override:
        if not override.isdigit() or int(override) < 1:
            raise ValueError(f"{ENV_OVERRIDE} must be a positive integer, got {override!r}")
        return int(override)
    cpus = len(set(affinity)) if affinity is not None else _affinity_count()
    quota = cgroup_cpu_quota(Path(root))
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def cgroup_cpu_quota(root: Path) -> float | None:
    """The tightest CFS quota (in CPUs) over the process's cgroup and its ancestors; None if unlimited."""
    v2_path, v1_path = _own_cgroup_paths(root)
    cgroup_fs = root / "sys/fs/cgroup"
    quotas = [_v2_quota(d) for d in _levels(cgroup_fs, v2_path)]
    for mount in _V1_CPU_MOUNTS:
        quotas += [_v1_quota(d) for d in _levels(cgroup_fs / mount, v1_path)]
    found = [q for q in quotas if q is not None]
    return min(found) if found else None


def _affinity_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _own_cgroup_paths(root: Path) -> tuple[str, str]:
    """The cgroup v2 path and the v1 ``cpu`` controller path from ``/proc/self/cgroup``."""
    v2, v1 = "/", "/"
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return v2, v1
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _levels(mount: Path, cgroup_path: str) -> list[Path]:
    """``mount/<path>`` and each of its parents up to ``mount``, keeping those that exist.

    Inside a container with its own cgroup namespace the path is ``/``; without one (cgroup v1
    Docker) the host path does not exist under the container's mount, and the mount root holds
    the container's own limits.
    """
    rel = PurePosixPath(cgroup_path).relative_to("/") if cgroup_path.startswith("/") else PurePosixPath()
    dirs = [mount / rel, *(mount / p for p in rel.parents)]
    return [d for d in dirs if d.is_dir()]


def _v2_quota(directory: Path) -> float | None:
    try:
        fields = (directory / "cpu.max").read_text().split()
    except OSError:
        return None
    if len(fields) != 2 or fields[0] == "max":
        return None
    return _ratio(fields[0], fields[1])


def _v1_quota(directory: Path) -> float | None:
    try:
        quota = (directory / "cpu.cfs_quota_us").read_text().strip()
        period = (directory / "cpu.cfs_period_us").read_text().strip()
    except OSError:
        return None
    return _ratio(quota, period)


def _ratio(quota: str, period: str) -> float | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:
        return None
    if q <= 0 or p <= 0:  # -1: no limit
        return None
    return q / p
