"""Text views shared by ``edgectl`` commands (device show, deploy status)."""

from __future__ import annotations

from collections.abc import Mapping

from modules.contract import ModuleStatus


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
            lines.append(f"    {m.pull.describe()}")
        if m.message:
            lines.append(f"    {m.message}")
        if health is not None and health.error:
            lines.append(f"    probe: {health.error}")
    return lines
