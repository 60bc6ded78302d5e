"""Background pulls shared by the runtimes: one task per image, the last failure of each image.

``PullTracker.start`` begins a fetch and returns at once; the runtime's ``observe`` asks the
tracker what is in flight and what failed, so the planner moves on with other modules while a
slow or broken registry holds one image back.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection

from agent.observed import ImageAvailability, PullFailure
from modules.contract import utcnow

log = logging.getLogger(__name__)

Fetch = Callable[[], Awaitable[None]]


class PullTracker:
    """Pulls in flight (asyncio tasks) and the last failure of every image whose latest pull failed."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._failed: dict[str, PullFailure] = {}
        self.requested: set[str] = set()
        """Every image a pull was started for: ``observe`` keeps reporting on them."""

    def start(self, image: str, fetch: Fetch) -> bool:
        """Run ``fetch`` in the background unless a pull of ``image`` is in flight; True when started."""
        self.requested.add(image)
        if image in self._tasks:
            return False
        self._tasks[image] = asyncio.create_task(self._run(image, fetch), name=f"pull {image}")
        return True

    async def _run(self, image: str, fetch: Fetch) -> None:
        try:
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

    @property
    def pulling(self) -> frozenset[str]:
        """Images with a pull in flight."""
        return frozenset(self._tasks)

    async def wait(self, image: str) -> None:
        """Wait until the pull of ``image`` in flight (if any) has finished."""
        task = self._tasks.get(image)
        if task is not None:
            await asyncio.shield(task)

    def availability(self, present: Collection[str]) -> ImageAvailability:
        """``ImageAvailability`` from the images found locally and the pulls in flight or failed."""
        here = frozenset(present)
        return ImageAvailability(
            present=here,
            pulling=self.pulling - here,
            failed={k: v for k, v in self._failed.items() if k not in here},
        )

    async def close(self) -> None:
        """Cancel the pulls in flight (a download already inside the engine may still finish)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
