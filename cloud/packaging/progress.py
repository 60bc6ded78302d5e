"""Progress output for packaging: step lines and throttled per-layer transfer lines.

Docker Engine streams (load, pull) are JSON objects per line; ``follow_engine_stream`` turns them
into the same output and raises on the first ``error`` object.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, TextIO

from cloud.packaging.errors import EngineError


def human_bytes(n: float) -> str:
    """``1536`` → ``1.5 KB`` (decimal units, as registries and ``docker images`` show them)."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


class Progress(Protocol):
    """Where packaging reports what it is doing."""

    def step(self, message: str) -> None:
        """A new step started (one line)."""

    def transfer(self, label: str, done: int, total: int | None) -> None:
        """``done`` of ``total`` bytes of ``label`` (a layer, a blob) moved so far."""


class Silent:
    """Reports nothing."""

    def step(self, message: str) -> None:
        """Ignore the step."""

    def transfer(self, label: str, done: int, total: int | None) -> None:
        """Ignore the transfer."""


class LinePrinter:
    """Prints steps, and per label a transfer line at most every ``interval_s`` plus the final one."""

    def __init__(self, out: TextIO | None = None, interval_s: float = 1.0) -> None:
        self.out = out or sys.stderr
        self.interval_s = interval_s
        self._last: dict[str, float] = {}
        self._shown: dict[str, int] = {}

    def step(self, message: str) -> None:
        """Print ``message`` on its own line."""
        print(message, file=self.out, flush=True)

    def transfer(self, label: str, done: int, total: int | None) -> None:
        """Print ``label: done / total`` when due, always when complete."""
        now = time.monotonic()
        finished = total is not None and done >= total
        if self._shown.get(label) == done or (
            not finished and now - self._last.get(label, 0.0) < self.interval_s
        ):
            return
        self._last[label] = now
        self._shown[label] = done
        amount = human_bytes(done) if total is None else f"{human_bytes(done)} / {human_bytes(total)}"
        print(f"  {label}: {amount}", file=self.out, flush=True)


def follow_engine_stream(
    events: Iterable[Mapping[str, Any]], progress: Progress, action: str
) -> list[Mapping[str, Any]]:
    """Relay a Docker Engine JSON stream (load, pull, build) to ``progress``; raise on an error event."""
    seen: list[Mapping[str, Any]] = []
    for event in events:
        seen.append(event)
        if "error" in event or "errorDetail" in event:
            detail = event.get("errorDetail") or {}
            message = str(event.get("error") or detail.get("message") or event).strip()
            raise EngineError(f"docker {action} failed: {message}")
        if "stream" in event:
            text = str(event["stream"]).strip()
            if text:
                progress.step(f"  {text}")
            continue
        status = str(event.get("status", "")).strip()
        layer = str(event.get("id", "")).strip()
        detail = event.get("progressDetail") or {}
        if detail.get("current") is not None:
            progress.transfer(
                f"{status.lower()} {layer}".strip(), int(detail["current"]), detail.get("total")
            )
        elif status:
            progress.step(f"  {layer + ': ' if layer else ''}{status}")
    return seen
