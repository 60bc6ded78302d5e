"""Text views shared by ``edgectl`` commands (device show, deploy status)."""

from __future__ import annotations

from collections.abc import Mapping

from modules.contract import ModuleStatus, PullProgress


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def pull_line(p: PullProgress) -> str:
    """``pull 3.2 of 12.0 MB (27%), 31 kB/s, ETA 4 min`` (or what the pull waits for)."""
    if p.waiting_until is not None:
        return f"pull of {p.image} waits for the update window (opens {p.waiting_until:%Y-%m-%d %H:%M} UTC)"
    if p.bytes_total is None:
        return f"pull of {p.image}: reading the manifest"
    parts = [f"pull {_mb(p.bytes_done)} of {_mb(p.bytes_total)} ({p.percent or 0:.0f}%)"]
    if p.bytes_per_s:
        parts.append(f"{p.bytes_per_s / 1e3:.1f} kB/s")
    if p.eta_s is not None:
        parts.append(f"ETA {p.eta_s / 60:.0f} min" if p.eta_s >= 90 else f"ETA {p.eta_s:.0f} s")
    if p.resumed_bytes:
        parts.append(f"{_mb(p.resumed_bytes)} kept across link drops")
    return ", ".join(parts)


def module_lines(modules: Mapping[str, ModuleStatus]) -> list[str]:
    """A line per module (status, health, restarts, profile, exit, provider, digest), then its fallback,
    message and probe."""
    lines = []
    for name, m in sorted(modules.items()):
        health = m.health
        probe = "-"
        if health is not None:
            probe = ("ready" if health.ready else "live" if health.live else "down") + (
                f" {health.latency_ms:g} ms" if health.latency_ms is not None else ""
            )
        parts = [
            f"  {name}: {m.runtime_status}",
            f"health {probe}",
            f"restarts {m.restart_count}",
            f"profile {m.profile}" if m.profile else "",
            f"exit {m.exit_code}" if m.exit_code is not None else "",
            f"provider {m.execution_provider}" if m.execution_provider else "",
            f"precision {m.precision}" if m.precision else "",
            f"digest {m.image_digest}" if m.image_digest else (f"image {m.image}" if m.image else ""),
        ]
        lines.append(", ".join(p for p in parts if p))
        if m.profile_note:
            lines.append(f"    fallback: {m.profile_note}")
        if m.pull is not None:
            lines.append(f"    {pull_line(m.pull)}")
        if m.message:
            lines.append(f"    {m.message}")
        if health is not None and health.error:
            lines.append(f"    probe: {health.error}")
    return lines
