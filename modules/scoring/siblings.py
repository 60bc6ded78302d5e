"""What a worker process knows of the other workers sharing its port (``SCORING_WORKERS`` > 1).

A request reaches whichever worker accepted its connection, so answers about the whole server
need the others:

- **readiness**: each worker marks ``worker-<i>.ready`` (or ``worker-<i>.failed`` with the reason)
  in the supervisor's private folder once its model is loaded; ``/v2/health/ready`` is 200 only
  when every worker is marked ready (a few ``stat`` calls, no messages);
- **metrics**: each worker also answers ``GET /metrics`` with its own figures on a Unix socket in
  that folder (``worker-<i>.sock``); the worker that gets a scrape asks the others and sums the
  figures (``metrics.merge_expositions``), so ``/metrics`` reports the whole server, whichever
  worker answers. A worker that does not answer within ``GATHER_TIMEOUT_S`` is left out and
  ``scoring_workers_reporting`` says so;
- **liveness**: each worker's event loop touches ``worker-<i>.alive`` every ``HEARTBEAT_S``, so the
  supervisor can tell a worker whose loop is stuck (``workers.WORKER_STUCK_S``): its share of the
  connections would hang while health probes that reach the other workers pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from modules.scoring.config import WorkerSlot

log = logging.getLogger("modules.scoring")

GATHER_TIMEOUT_S = 2.0
HEARTBEAT_S = 1.0
"""How often a worker's event loop touches ``worker-<i>.alive``; the supervisor watches it."""


class Siblings:
    """This worker's view of the others; ``own_metrics`` renders this worker's own figures."""

    def __init__(self, slot: WorkerSlot, own_metrics: Callable[[], str]) -> None:
        self.slot = slot
        self._own_metrics = own_metrics
        self._runner: web.AppRunner | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    def _path(self, index: int, suffix: str) -> Path:
        return self.slot.run_dir / f"worker-{index}.{suffix}"

    def _others(self) -> list[int]:
        return [i for i in range(1, self.slot.count + 1) if i != self.slot.index]

    async def start(self) -> None:
        """Answer the other workers' ``GET /metrics`` on this worker's Unix socket."""
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        path = self._path(self.slot.index, "sock")
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        await web.UnixSite(self._runner, str(path)).start()
        self._heartbeat = asyncio.create_task(self._beat())

    async def _beat(self) -> None:
        alive = self._path(self.slot.index, "alive")
        while True:
            with contextlib.suppress(OSError):  # the supervisor is gone; this worker ends with it
                alive.touch()
            await asyncio.sleep(HEARTBEAT_S)

    async def stop(self) -> None:
        """Stop answering the other workers and stop the heartbeat."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(text=self._own_metrics())

    def mark(self, ready: bool, reason: str = "") -> None:
        """Record this worker's outcome of loading: ready, or failed with ``reason``."""
        target = self._path(self.slot.index, "ready" if ready else "failed")
        scratch = target.with_suffix(".tmp")
        try:
            scratch.write_text(reason)
            os.replace(scratch, target)
        except OSError as exc:  # the supervisor removed its folder: it is stopping
            log.warning("worker %d cannot record that it is %s: %s", self.slot.index, target.suffix[1:], exc)

    def not_ready(self) -> str | None:
        """None when every other worker is ready, else why the server is not (the first one that is not)."""
        for index in self._others():
            if self._path(index, "ready").exists():
                continue
            who = f"worker {index}/{self.slot.count}"
            with contextlib.suppress(OSError):
                return f"{who}: initialisation failed: {self._path(index, 'failed').read_text()}"
            return f"{who}: still initialising (loading the model / running init())"
        return None

    async def gather_metrics(self) -> list[str]:
        """The other workers' own exposition texts, from those that answered in time."""

        async def fetch(index: int) -> str | None:
            connector = aiohttp.UnixConnector(path=str(self._path(index, "sock")))
            timeout = aiohttp.ClientTimeout(total=GATHER_TIMEOUT_S)
            try:
                async with (
                    aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
                    session.get("http://worker/metrics") as response,
                ):
                    if response.status == 200:
                        return await response.text()
                    log.warning("worker %d did not give its metrics: HTTP %d", index, response.status)
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                log.warning("worker %d did not give its metrics: %s", index, exc or type(exc).__name__)
            return None

        texts = await asyncio.gather(*(fetch(i) for i in self._others()))
        return [t for t in texts if t is not None]
