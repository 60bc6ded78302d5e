"""Templates and the small helpers they use: times, sizes, status colours, SVG geometry.

Every template is autoescaped (Jinja2 ``select_autoescape`` on for ``.html``): whatever a device
wrote (reasons, messages, log lines, reported fields) reaches the page as text. Nothing here marks
a value safe. Pages and the fragments live updates send come from the same templates, so a row
looks the same whether it was rendered with the page or pushed later.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import jinja2

from modules.contract import utcnow

STATUS_CLASS = {
    "online": "ok",
    "healthy": "ok",
    "running": "ok",
    "complete": "ok",
    "succeeded": "ok",
    "applying": "busy",
    "pending": "busy",
    "pulling": "busy",
    "created": "busy",
    "rolling": "busy",
    "waiting": "idle",
    "never seen": "idle",
    "stopped": "idle",
    "superseded": "idle",
    "-": "idle",
    "stale": "warn",
    "unhealthy": "warn",
    "backoff": "warn",
    "halted": "bad",
    "reverted": "warn",
    "offline": "bad",
    "failed": "bad",
    "rolled_back": "bad",
    "rolled back": "bad",
    "rejected": "bad",
}
"""Status → CSS class (``ok``, ``busy``, ``idle``, ``warn``, ``bad``)."""
WAVE_COLOURS = (("healthy", "ok"), ("applying", "busy"), ("pending", "busy"), ("failed", "bad"))


def ago(when: datetime | None, now: datetime | None = None) -> str:
    """``12 s ago``, ``5 min ago``, ``3 h ago``, ``2 d ago``; ``never`` for None."""
    if when is None:
        return "never"
    seconds = ((now or utcnow()) - when).total_seconds()
    if seconds < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def iso(when: datetime | None) -> str:
    """UTC time to the second, ``2026-01-02 03:04:05Z``; empty for None."""
    if when is None:
        return ""
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")


def size(n: int | float | None) -> str:
    """Bytes in B/KiB/MiB/GiB."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def status_class(status: str | None) -> str:
    """The CSS class of a status word."""
    return STATUS_CLASS.get(status or "-", "idle")


def sparkline(samples: list[tuple[float, int, int]], width: int = 240, height: int = 40) -> str:
    """SVG ``points`` of a polyline of healthy devices over time, from ``(time, devices, healthy)``."""
    if not samples:
        return ""
    t0, t1 = samples[0][0], samples[-1][0]
    top = max(max(n for _, n, _ in samples), 1)
    span = (t1 - t0) or 1.0
    return " ".join(
        f"{(t - t0) / span * width:.1f},{height - 2 - healthy / top * (height - 4):.1f}"
        for t, _, healthy in samples
    )


def wave_segments(counts: dict[str, int], devices: int, width: float = 300.0) -> list[dict[str, Any]]:
    """Stacked-bar segments of one rollout wave: ``{x, w, cls, label}`` by status."""
    if devices <= 0:
        return []
    out = []
    x = 0.0
    for status, n in sorted(counts.items(), key=lambda kv: (status_class(kv[0]) != "ok", kv[0])):
        w = n / devices * width
        out.append(
            {"x": round(x, 1), "w": round(w, 1), "cls": status_class(status), "label": f"{status} {n}"}
        )
        x += w
    return out


def environment() -> jinja2.Environment:
    """The dashboard's template environment (package templates, autoescaped, strict undefined)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("cloud.dashboard", "templates"),
        autoescape=jinja2.select_autoescape(["html"], default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(ago=ago, iso=iso, size=size, cls=status_class)
    env.globals.update(sparkline=sparkline, wave_segments=wave_segments)
    return env
