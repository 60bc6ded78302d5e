"""The rollout controller inside ``edgectl serve``: what ``edgectl deploy watch`` does, as a background task.

It ingests reported states and online messages (``Ingestor``), and every interval advances rollout
waves (``Fleet.advance_rollouts``) and publishes pending desired states (``Fleet.publish_pending``).
When the broker is unreachable the API keeps serving; the controller logs why and retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from cloud.api.context import Services, services_key
from cloud.fleet.ingest import Ingestor
from cloud.fleet.mqtt import BrokerUnavailable

log = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 2.0
RETRY_S = 5.0


async def _pass(s: Services) -> None:
    for line in await asyncio.to_thread(s.fleet.advance_rollouts, endpoint=s.endpoint):
        log.info("rollout %s", line)
    if await asyncio.to_thread(s.fleet.pending_count):
        report = await asyncio.to_thread(s.fleet.publish_pending, s.endpoint)
        if report.published:
            log.info("published %d pending desired state(s)", report.published)
    s.controller.passes += 1


async def run_controller(s: Services, interval_s: float, retry_s: float = RETRY_S) -> None:
    """Ingest, advance and publish until cancelled, reconnecting to the broker when it goes away."""
    state = s.controller
    state.enabled = True
    while True:
        try:
            async with Ingestor(s.fleet.db, s.endpoint) as ingest:
                state.ingest = ingest.stats
                state.connected, state.error = True, None
                log.info("controller: ingesting reports from %s", s.endpoint.url)
                while True:
                    try:
                        await _pass(s)
                    except (BrokerUnavailable, TimeoutError):
                        raise
                    except Exception as e:
                        state.error = f"controller pass failed: {type(e).__name__}: {e}"
                        log.exception("controller pass failed; trying again next interval")
                    await asyncio.sleep(interval_s)
        except (BrokerUnavailable, TimeoutError, OSError) as e:
            state.connected, state.error = False, str(e)
            log.warning("controller: %s; retrying in %g s", e, retry_s)
        await asyncio.sleep(retry_s)


def controller_context(interval_s: float) -> Callable[[web.Application], AsyncIterator[None]]:
    """A ``cleanup_ctx`` entry that runs the controller for the app's lifetime."""

    async def context(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(run_controller(app[services_key], interval_s), name="rollout-controller")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    return context
