"""Background pulls shared by the runtimes: one task per image, the last failure of each image.

``PullTracker.start`` begins a fetch and returns at once; the runtime's ``observe`` asks the
tracker what is in flight and what failed, so the planner moves on with other modules while a
slow or broken registry holds one image back. With an ``UpdateWindow`` a fetch starts only
inside it (it waits, shown as ``PullProgress.waiting_until``). Fetches report their progress
with ``report``; ``availability`` hands it on at most every ``progress_every_s`` per image, so
the reports a pull causes stay few on a slow link.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from datetime import datetime

from agent.observed import ImageAvailability, PullFailure
from agent.runtime.pull_policy import UpdateWindow
from modules.contract import PullProgress, utcnow

log = logging.getLogger(__name__)

Fetch = Callable[[], Awaitable[None]]


class PullTracker:
    """Pulls in flight (asyncio tasks) and the last failure of every image whose latest pull failed."""

    def __init__(
        self,
        window: UpdateWindow | None = None,
        progress_every_s: float = 10.0,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failed: dict[str, PullFailure] = {}
        self.requested: set[str] = set()
        """Every image a pull was started for: ``observe`` keeps reporting on them."""
        self.window = window
        self.progress_every_s = progress_every_s
        self.clock = clock
        self._live: dict[str, PullProgress] = {}
        self._waiting: set[str] = set()
        self._shown: dict[str, tuple[float, PullProgress]] = {}

    def report(self, image: str, progress: PullProgress) -> None:
        """The latest progress of the pull of ``image`` (called by the fetch as bytes arrive)."""
        self._live[image] = progress

    def start(self, image: str, fetch: Fetch) -> bool:
        """Run ``fetch`` in the background unless a pull of ``image`` is in flight; True when started."""
        self.requested.add(image)
        if image in self._tasks:
            return False
        self._tasks[image] = asyncio.create_task(self._run(image, fetch), name=f"pull {image}")
        return True

    async def _wait_for_window(self, image: str) -> None:
        if self.window is None:
            return
        try:
            while not self.window.contains(now := self.clock()):
                self._waiting.add(image)
                opens = self.window.next_open(now)
                self.report(image, PullProgress(image=image, waiting_until=opens))
                log.info("pull of %s waits for the update window %s (opens %s)", image, self.window, opens)
                await asyncio.sleep(min(max((opens - now).total_seconds(), 1.0), 3600.0))
        finally:
            self._waiting.discard(image)

    async def _run(self, image: str, fetch: Fetch) -> None:
        try:
            await self._wait_for_window(image)
            self.report(image, PullProgress(image=image))
            await fetch()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            previous = self._failed.get(image)
            attempts = previous.attempts + 1 if previous else 1
            error = str(exc) or type(exc).__name__
            self._failed[image] = PullFailure(error=error, failed_at=utcnow(), attempts=attempts)
            log.warning("pull of %s failed: %s (attempt %d)", image, error, attempts)
        else:
            self._failed.pop(image, None)
            log.info("pulled %s", image)
        finally:
            self._tasks.pop(image, None)
            self._live.pop(image, None)
            self._shown.pop(image, None)

    @property
    def pulling(self) -> frozenset[str]:
        """Images being downloaded now (not those waiting for the update window: nothing to poll)."""
        return frozenset(self._tasks) - self._waiting

    async def wait(self, image: str) -> None:
        """Wait until the pull of ``image`` in flight (if any) has finished."""
        task = self._tasks.get(image)
        if task is not None:
            await asyncio.shield(task)

    def availability(self, present: Collection[str]) -> ImageAvailability:
        """``ImageAvailability`` from the images found locally and the pulls in flight or failed."""
        here = frozenset(present)
        pulling = frozenset(self._tasks) - here  # waiting for the window counts: it is asked for
        return ImageAvailability(
            present=here,
            pulling=pulling,
            failed={k: v for k, v in self._failed.items() if k not in here},
            progress={image: p for image in pulling if (p := self._progress(image)) is not None},
        )

    def _progress(self, image: str) -> PullProgress | None:
        """The progress to show for ``image``: the live one, refreshed at most every ``progress_every_s``."""
        live = self._live.get(image)
        if live is None:
            return None
        now = time.monotonic()
        shown = self._shown.get(image)
        waiting_changed = shown is not None and (shown[1].waiting_until is None) != (
            live.waiting_until is None
        )
        if shown is None or waiting_changed or now - shown[0] >= self.progress_every_s:
            self._shown[image] = (now, live)
            return live
        return shown[1]

    async def close(self) -> None:
        """Cancel the pulls in flight (a download already inside the engine may still finish)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
