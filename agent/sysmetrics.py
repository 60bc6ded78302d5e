"""System metrics for reports: CPU %, memory, free disk of the state dir, temperature.

Read straight from ``/proc`` and ``/sys`` (below a configurable ``root``) instead of importing
psutil, to keep the agent small. CPU % is the busy share of all CPUs since the previous sample
(since boot for the first one).
"""

from __future__ import annotations

import os
from pathlib import Path

from modules.contract import SystemMetrics

MIB = 1024 * 1024


class MetricsError(OSError):
    """A file the metrics come from is missing or unreadable; the message names it."""


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise MetricsError(f"cannot read {path}: {exc.strerror or exc}") from None


def cpu_times(root: Path = Path("/")) -> tuple[int, int]:
    """``(busy, total)`` jiffies of all CPUs from ``/proc/stat`` (guest time is inside user time)."""
    path = root / "proc/stat"
    lines = _read(path).splitlines()
    line = lines[0] if lines else ""
    fields = line.split()
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        raise MetricsError(f"{path}: first line is not the 'cpu' summary: {line!r}")
    values = [int(v) for v in fields[1:9]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values)
    return total - idle, total


def memory_mb(root: Path = Path("/")) -> tuple[float, float]:
    """``(used, total)`` MiB from ``/proc/meminfo`` (used = total - available)."""
    path = root / "proc/meminfo"
    info: dict[str, int] = {}
    for line in _read(path).splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            info[key] = int(parts[0])
    if "MemTotal" not in info:
        raise MetricsError(f"{path}: no MemTotal")
    available = info.get("MemAvailable")
    if available is None:
        available = info.get("MemFree", 0) + info.get("Buffers", 0) + info.get("Cached", 0)
    return (info["MemTotal"] - available) / 1024, info["MemTotal"] / 1024


def disk_free_mb(path: Path) -> float:
    """Free MiB for an unprivileged writer on the file system of ``path`` (or its nearest existing parent)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    st = os.statvfs(probe)
    return st.f_bavail * st.f_frsize / MIB


def temperature_c(root: Path = Path("/")) -> float | None:
    """The hottest thermal zone in °C, or None when there is none (containers, most VMs)."""
    readings = []
    for zone in (root / "sys/class/thermal").glob("thermal_zone*/temp"):
        try:
            readings.append(int(zone.read_text().strip()) / 1000)
        except (OSError, ValueError):
            continue
    return max(readings) if readings else None


class SystemSampler:
    """Samples ``SystemMetrics``; keeps the previous CPU counters for the CPU % between samples."""

    def __init__(self, state_dir: Path, root: Path = Path("/"), *, min_free_mb: float | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.root = Path(root)
        self.min_free_mb = min_free_mb
        """The free disk pulls must leave: below it the metrics say ``disk_low``."""
        self._last_cpu: tuple[int, int] = (0, 0)

    def sample(self) -> SystemMetrics:
        """The metrics now. Raises :class:`MetricsError` naming an unreadable source file."""
        busy, total = cpu_times(self.root)
        last_busy, last_total = self._last_cpu
        self._last_cpu = (busy, total)
        d_total = total - last_total
        cpu = 100.0 * (busy - last_busy) / d_total if d_total > 0 else 0.0
        used, mem_total = memory_mb(self.root)
        free = round(disk_free_mb(self.state_dir), 1)
        return SystemMetrics(
            cpu_percent=round(min(max(cpu, 0.0), 100.0), 1),
            memory_used_mb=round(max(used, 0.0), 1),
            memory_total_mb=round(mem_total, 1),
            disk_free_mb=free,
            temperature_c=temperature_c(self.root),
            disk_min_free_mb=self.min_free_mb,
            disk_low=self.min_free_mb is not None and free < self.min_free_mb,
        )
