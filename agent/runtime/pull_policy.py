"""How much and when the agent may download: a token bucket (bytes/s) and an update window.

``TokenBucket`` is shared by every pull of a device, so the budget holds for all of them
together. ``UpdateWindow`` is a daily ``HH:MM-HH:MM`` span in UTC (it may wrap midnight): pulls
start only inside it. Both take the time as an argument where it matters, so tests need no clock.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

_WINDOW_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)$")


class TokenBucket:
    """At most ``rate`` bytes/s on average, bursts up to ``burst`` bytes.

    ``take(n)`` waits until ``n`` bytes may pass. A request larger than the burst is let through
    once the bucket is full and drives it negative, so callers may read any chunk size.
    """

    def __init__(
        self, rate: float, burst: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0:
            raise ValueError(f"rate must be positive, not {rate}")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else max(rate / 4, 16 * 1024))
        self._clock = clock
        self._tokens = self.burst
        self._at = clock()
        self._lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    def delay_for(self, n: int) -> float:
        """Seconds to wait before ``n`` bytes may pass (0 when they may now); takes them when 0."""
        self._refill()
        need = min(float(n), self.burst)
        if self._tokens >= need:
            self._tokens -= n
            return 0.0
        return (need - self._tokens) / self.rate

    async def take(self, n: int) -> None:
        """Wait until ``n`` bytes may pass, then count them."""
        async with self._lock:  # first come, first served between concurrent pulls
            while (wait := self.delay_for(n)) > 0:  # noqa: ASYNC110  (pacing is the point: no event to wait on)
                await asyncio.sleep(wait)


@dataclass(frozen=True)
class UpdateWindow:
    """A daily span ``start``-``end`` (minutes after midnight UTC); ``end < start`` wraps midnight."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> UpdateWindow:
        """``"HH:MM-HH:MM"`` (UTC); ``ValueError`` with the expected form otherwise."""
        m = _WINDOW_RE.match(text.strip())
        if m is None:
            raise ValueError(f"update window {text!r} must look like HH:MM-HH:MM (UTC), e.g. 01:00-05:00")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        start, end = h1 * 60 + m1, h2 * 60 + m2
        if start == end:
            raise ValueError(f"update window {text!r} is empty: start and end are the same")
        return cls(start, end)

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d} UTC"

    def contains(self, now: datetime) -> bool:
        """True when ``now`` (aware) is inside the window."""
        minute = now.hour * 60 + now.minute
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def next_open(self, now: datetime) -> datetime:
        """``now`` when inside the window, else when it opens next."""
        if self.contains(now):
            return now
        midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
        opens = midnight + timedelta(minutes=self.start)
        return opens if opens > now else opens + timedelta(days=1)
