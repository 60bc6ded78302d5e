"""Notice store changes for live pages, and keep a short history of healthy devices per deployment.

The watcher reads a cheap fingerprint of the store (counts and newest times of reports, online
messages, desired states, rollouts, deployments and devices) every ``POLL_S``. It sees writes of
this server's controller and of any other process on the same database (``edgectl deploy apply``
from a shell, a second ``edgectl serve``) alike, and it costs the same whether ten or ten thousand
browsers watch. When the fingerprint changes it bumps ``version`` and wakes every live page, which
then re-reads only what it shows. It also samples ``(devices, healthy)`` per deployment (one
grouped query) for the rollout sparklines, and, when online messages arrived, notes which devices
went online or offline (``PresenceLog``) for the device page's online history. Both live in memory
only: the store keeps a device's latest online message, not its history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import datetime

from aiohttp import web

from cloud.api.context import services_key
from cloud.api.routing import call
from cloud.dashboard.queries import fingerprint, healthy_by_deployment, online_rows
from cloud.store.db import Database

log = logging.getLogger(__name__)

POLL_S = 0.5
SAMPLE_EVERY_S = 2.0
HISTORY = 300
"""Samples kept per deployment (10 minutes at one sample every 2 s)."""
TRANSITIONS = 50
"""Online/offline changes kept per device."""
ONLINE_PART = slice(2, 4)
"""The part of ``fingerprint`` that online messages change."""


class PresenceLog:
    """Online/offline changes of each device, as seen in the store's latest online messages."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        """The watcher updates from its worker thread while pages read from theirs."""
        self.current: dict[str, tuple[bool, datetime]] = {}
        self.changes: dict[str, deque[tuple[datetime, bool]]] = {}
        """device → ``(since, online)`` of each change seen while this server ran, oldest first."""

    def update(self, rows: Iterable[tuple[str, bool, datetime]]) -> None:
        """Take the latest ``(device, online, since)`` of every device; note what changed."""
        with self._lock:
            self._update(rows)

    def _update(self, rows: Iterable[tuple[str, bool, datetime]]) -> None:
        for device, online, since in rows:
            before = self.current.get(device)
            self.current[device] = (online, since)
            if before is not None and before != (online, since):
                log = self.changes.setdefault(device, deque(maxlen=TRANSITIONS))
                if not log:
                    log.append((before[1], before[0]))
                log.append((since, online))

    def history(self, device: str) -> list[tuple[datetime, bool]]:
        """``(since, online)`` changes of ``device``, newest first (at least its current state)."""
        with self._lock:
            log = list(self.changes.get(device, ()))
            current = self.current.get(device)
        if not log and current is not None:
            log = [(current[1], current[0])]
        return log[::-1]


class Watcher:
    """Store-change notifications for live pages; see the module docstring."""

    def __init__(self, db: Database, clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.clock = clock
        self.version = 0
        self._changed = asyncio.Condition()
        self._last: tuple[object, ...] | None = None
        self._sampled_at = 0.0
        self.history: dict[str, tuple[tuple[float, int, int], ...]] = {}
        """deployment → ``(unix time, devices, healthy)`` samples, oldest first. Replaced whole on
        every sample, never changed in place: pages read it in worker threads."""
        self.presence = PresenceLog()

    async def wait(self, seen: int, timeout_s: float) -> int:
        """The version once it is past ``seen`` (or after ``timeout_s``, whichever is first)."""
        async with self._changed:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: self.version > seen), timeout_s)
            return self.version

    def _read(self) -> tuple[tuple[object, ...], dict[str, tuple[int, int]] | None]:
        with self.db.transaction() as s:
            mark = fingerprint(s)
            if self._last is None or mark[ONLINE_PART] != self._last[ONLINE_PART]:
                self.presence.update(online_rows(s))
            due = self.clock() - self._sampled_at >= SAMPLE_EVERY_S
            return mark, healthy_by_deployment(s) if due and mark != self._last else None

    async def poll_once(self) -> bool:
        """Read the store once; True (and every page woken) when it changed."""
        mark, counts = await call(self._read)
        if counts is not None:
            self._sample(counts)
        if mark == self._last:
            return False
        self._last = mark
        async with self._changed:
            self.version += 1
            self._changed.notify_all()
        return True

    def _sample(self, counts: dict[str, tuple[int, int]]) -> None:
        now = self.clock()
        self._sampled_at = now
        history: dict[str, tuple[tuple[float, int, int], ...]] = {}
        for name, (devices, healthy) in counts.items():
            samples = self.history.get(name, ())
            if not samples or samples[-1][1:] != (devices, healthy):
                samples = (*samples, (now, devices, healthy))[-HISTORY:]
            history[name] = samples
        self.history = history

    async def run(self, poll_s: float = POLL_S) -> None:
        """Poll until cancelled; a failed read is logged and tried again."""
        failing = False
        while True:
            try:
                await self.poll_once()
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not failing:
                    log.warning("dashboard: cannot read the store for live updates: %s", e)
                failing = True
            await asyncio.sleep(poll_s)


watcher_key = web.AppKey("dashboard_watcher", Watcher)


async def watcher_context(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx`` entry: the watcher runs for the app's lifetime."""
    watcher = Watcher(app[services_key].db)
    app[watcher_key] = watcher
    task = asyncio.create_task(watcher.run(), name="dashboard-watcher")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
