"""System metrics from fake /proc and /sys trees."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.sysmetrics import MetricsError, SystemSampler, cpu_times, memory_mb, temperature_c

MEMINFO = """\
MemTotal:        2048000 kB
MemFree:          100000 kB
MemAvailable:     512000 kB
Buffers:           20000 kB
Cached:           300000 kB
"""


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def stat_line(
    user: int, nice: int, system: int, idle: int, iowait: int, irq: int = 0, softirq: int = 0
) -> str:
    return f"cpu  {user} {nice} {system} {idle} {iowait} {irq} {softirq} 0 0 0\ncpu0 1 2 3 4 5 6 7 0 0 0\n"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    write(tmp_path, "proc/stat", stat_line(100, 0, 100, 700, 100))
    write(tmp_path, "proc/meminfo", MEMINFO)
    return tmp_path


def test_cpu_percent_is_the_busy_share_between_samples(root: Path) -> None:
    sampler = SystemSampler(state_dir=root, root=root)
    first = sampler.sample()
    assert first.cpu_percent == 20.0  # since boot: 200 busy of 1000 (iowait counts as idle)
    write(root, "proc/stat", stat_line(100 + 60, 0, 100 + 15, 700 + 20, 100 + 5))
    assert sampler.sample().cpu_percent == 75.0  # 75 busy of 100
    assert sampler.sample().cpu_percent == 0.0  # no time passed


def test_memory_uses_mem_available(root: Path) -> None:
    assert memory_mb(root) == (1500.0, 2000.0)
    metrics = SystemSampler(root, root).sample()
    assert (metrics.memory_used_mb, metrics.memory_total_mb) == (1500.0, 2000.0)


def test_memory_without_mem_available_counts_caches_as_free(root: Path) -> None:
    write(root, "proc/meminfo", "\n".join(line for line in MEMINFO.splitlines() if "Available" not in line))
    used, total = memory_mb(root)
    assert (used, total) == ((2048000 - 420000) / 1024, 2000.0)


def test_temperature_is_the_hottest_zone_and_absent_without_zones(root: Path) -> None:
    assert temperature_c(root) is None
    assert SystemSampler(root, root).sample().temperature_c is None
    write(root, "sys/class/thermal/thermal_zone0/temp", "45500\n")
    write(root, "sys/class/thermal/thermal_zone1/temp", "61000\n")
    write(root, "sys/class/thermal/thermal_zone2/temp", "garbage\n")
    assert temperature_c(root) == 61.0


def test_disk_free_of_the_state_dir_even_before_it_exists(root: Path) -> None:
    metrics = SystemSampler(root / "state" / "not-yet", root).sample()
    assert metrics.disk_free_mb > 0


def test_disk_low_is_free_space_below_the_pulls_floor(root: Path) -> None:
    free = SystemSampler(root, root).sample()
    assert (free.disk_low, free.disk_min_free_mb) == (False, None), "no floor: never low"
    assert SystemSampler(root, root, min_free_mb=1).sample().disk_low is False
    low = SystemSampler(root, root, min_free_mb=free.disk_free_mb * 10).sample()
    assert low.disk_low and low.disk_min_free_mb == free.disk_free_mb * 10
    assert low.disk_warning() is not None and "pulls need" in (low.disk_warning() or "")


def test_missing_proc_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(MetricsError, match=r"proc/stat"):
        cpu_times(tmp_path)
    write(tmp_path, "proc/stat", "intr 1 2 3\n")
    with pytest.raises(MetricsError, match=r"not the 'cpu' summary"):
        cpu_times(tmp_path)
    with pytest.raises(MetricsError, match=r"proc/meminfo"):
        memory_mb(tmp_path)


def test_the_real_machine_reads(tmp_path: Path) -> None:
    metrics = SystemSampler(tmp_path).sample()
    assert 0 <= metrics.cpu_percent <= 100
    assert 0 < metrics.memory_used_mb < metrics.memory_total_mb
