"""allowed_cpus: affinity capped by cgroup v1/v2 CPU quotas, read from a faked filesystem root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modules.scoring.cpus import allowed_cpus, cgroup_cpu_quota

EIGHT = range(8)


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _v2(root: Path, cpu_max: str, cgroup: str = "/") -> None:
    _write(root, "proc/self/cgroup", f"0::{cgroup}\n")
    _write(root, f"sys/fs/cgroup{cgroup.rstrip('/')}/cpu.max", cpu_max + "\n")


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000", 8), ("200000 100000", 2), ("150000 100000", 2), ("50000 100000", 1), ("1000 100000", 1)],
)
def test_cgroup_v2_quota_rounds_up(tmp_path: Path, cpu_max: str, expected: int) -> None:
    _v2(tmp_path, cpu_max)
    assert allowed_cpus(root=tmp_path, environ={}, affinity=EIGHT) == expected


def test_affinity_caps_a_larger_quota(tmp_path: Path) -> None:
    _v2(tmp_path, "400000 100000")
    assert allowed_cpus(root=tmp_path, environ={}, affinity={2, 3}) == 2


def test_cgroup_v2_ancestor_limit_applies(tmp_path: Path) -> None:
    # The process sits in a child cgroup without a limit; its parent allows 3 CPUs.
    _write(tmp_path, "proc/self/cgroup", "0::/system.slice/scoring.service\n")
    _write(tmp_path, "sys/fs/cgroup/system.slice/cpu.max", "300000 100000\n")
    _write(tmp_path, "sys/fs/cgroup/system.slice/scoring.service/cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 3.0
    assert allowed_cpus(root=tmp_path, environ={}, affinity=EIGHT) == 3


def test_cgroup_v1_quota_at_the_container_mount_root(tmp_path: Path) -> None:
    # cgroup v1 Docker: /proc/self/cgroup shows the host path, the mount root holds the limits.
    _write(tmp_path, "proc/self/cgroup", "4:cpu,cpuacct:/docker/abc123\n2:memory:/docker/abc123\n")
    _write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "250000\n")
    _write(tmp_path, "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n")
    assert allowed_cpus(root=tmp_path, environ={}, affinity=EIGHT) == 3


def test_cgroup_v1_unlimited(tmp_path: Path) -> None:
    _write(tmp_path, "proc/self/cgroup", "1:cpu:/\n")
    _write(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_quota_us", "-1\n")
    _write(tmp_path, "sys/fs/cgroup/cpu/cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    assert allowed_cpus(root=tmp_path, environ={}, affinity=EIGHT) == 8


def test_no_cgroup_files_means_affinity(tmp_path: Path) -> None:
    assert allowed_cpus(root=tmp_path, environ={}, affinity=range(5)) == 5


def test_env_override_wins(tmp_path: Path) -> None:
    _v2(tmp_path, "100000 100000")
    assert allowed_cpus(root=tmp_path, environ={"SCORING_THREADS": "6"}, affinity=EIGHT) == 6


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_env_override_is_rejected(tmp_path: Path, value: str) -> None:
    with pytest.raises(ValueError, match=f"SCORING_THREADS must be a positive integer, got '{value}'"):
        allowed_cpus(root=tmp_path, environ={"SCORING_THREADS": value})


def test_this_machine() -> None:
    cpus = allowed_cpus(environ={})
    assert 1 <= cpus <= len(os.sched_getaffinity(0))
