"""The rollout controller inside ``edgectl serve``: ``cloud.fleet.controller`` as a background task.

It does what ``edgectl deploy watch`` does (ingest, recompute, advance, clear removed devices,
publish) and reports into ``Services.controller`` for ``GET /status``. When the broker is
unreachable the API keeps serving; the controller logs why and connects again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence

from aiohttp import web

from cloud.api.context import services_key
from cloud.fleet.controller import INTERVAL_S, Controller

DEFAULT_INTERVAL_S = INTERVAL_S


def controller_context(
    interval_s: float, reports_queue: Sequence[str] = ()
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` entry that runs the controller for the app's lifetime (``reports_queue``:
    the AMQP URLs of a RabbitMQ cluster's shared reports queue, as ``Controller`` takes them)."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        s = app[services_key]
        controller = Controller(
            s.fleet, s.endpoint, interval_s=interval_s, status=s.controller, reports_queue=reports_queue
        )
        task = asyncio.create_task(controller.run(), name="rollout-controller")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return context
