"""The rollout controller: ``edgectl deploy watch`` runs it in the foreground, ``edgectl serve`` as a task.

While connected to the broker it ingests reported states and online messages (``Ingestor``) and,
every ``interval_s``, makes one pass (``step``):

1. every ``recompute_every_s``, ``Fleet.recompute``: devices provisioned since the last apply get
   their desired state, and states nearing expiry are re-signed;
2. ``Fleet.advance_rollouts``: waves advance, complete, or halt (and revert);
3. ``Fleet.clear_removed`` and ``Fleet.publish_pending``: retained messages of removed devices are
   cleared, and desired states the broker has not acknowledged are published.

With ``reports_queue`` (the AMQP URLs of a RabbitMQ cluster) the controller speaks MQTT 3.1.1
without ``$share`` and takes reports from the cluster's shared quorum queue
(``cloud.fleet.amqp_reports``), so several controllers split the fleet's reports.

When the broker cannot be reached the controller says why, waits ``retry_s`` and connects again;
a connection lost later is re-established by paho, and the passes go on meanwhile (publishing
fails and stays pending until the broker is back). A pass that fails for another reason is logged
and the next one runs as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cloud.fleet.ingest import Ingestor, IngestStats
from cloud.fleet.service import Fleet
from edgemqtt.endpoint import BrokerUnavailable, Endpoint

log = logging.getLogger(__name__)

INTERVAL_S = 2.0
RECOMPUTE_EVERY_S = 30.0
RETRY_S = 5.0


class ControllerStatus(Protocol):
    """Where the controller reports what it is doing (``GET /status`` shows it)."""

    enabled: bool
    connected: bool
    error: str | None
    passes: int
    ingest: IngestStats


@dataclass
class Status:
    """A plain ``ControllerStatus``."""

    enabled: bool = False
    connected: bool = False
    error: str | None = None
    passes: int = 0
    ingest: IngestStats = field(default_factory=IngestStats)


class Controller:
    """Ingest, recompute, advance and publish for one fleet and broker; see the module docstring."""

    def __init__(
        self,
        fleet: Fleet,
        endpoint: Endpoint,
        *,
        interval_s: float = INTERVAL_S,
        recompute_every_s: float = RECOMPUTE_EVERY_S,
        retry_s: float = RETRY_S,
        status: ControllerStatus | None = None,
        say: Callable[[str], object] = log.info,
        warn: Callable[[str], object] = log.warning,
        reports_queue: Sequence[str] = (),
    ) -> None:
        self.fleet = fleet
        self.endpoint = endpoint
        self.interval_s = interval_s
        self.recompute_every_s = recompute_every_s
        self.retry_s = retry_s
        self.status: ControllerStatus = status if status is not None else Status()
        self.say = say
        self.warn = warn
        self._recomputed_at = float("-inf")
        self.reports_queue = list(reports_queue)

    async def run(self, *, until_settled: bool = False) -> None:
        """Run passes until cancelled (or, with ``until_settled``, until no rollout is rolling)."""
        self.status.enabled = True
        while True:
            try:
                async with self._ingest() as ingest:
                    self.status.ingest = ingest.stats
                    self.status.connected, self.status.error = True, None
                    self.say(
                        f"watching {self.endpoint.url}: ingesting reports, advancing rollouts every "
                        f"{self.interval_s:g} s"
                    )
                    while True:
                        await self.step(ingest)
                        if until_settled and not await asyncio.to_thread(self._rolling):
                            self.say(f"no rollout in progress ({ingest.stats.written} report(s) ingested)")
                            return
                        await asyncio.sleep(self.interval_s)
            except (BrokerUnavailable, TimeoutError) as e:
                self.status.connected, self.status.error = False, str(e)
                self.warn(f"{e}; connecting again in {self.retry_s:g} s")
            await asyncio.sleep(self.retry_s)

    @contextlib.asynccontextmanager
    async def _ingest(self) -> AsyncIterator[Ingestor]:
        if not self.reports_queue:
            async with Ingestor(self.fleet.db, self.endpoint) as ingest:
                yield ingest
            return
        from cloud.fleet.amqp_reports import AmqpReports  # aio-pika: only for RabbitMQ clusters

        async with (
            Ingestor(
                self.fleet.db,
                self.endpoint,
                shared=False,
                protocol="mqttv311",
                subscribe_qos=0,
                subscribe_reports=False,
            ) as ingest,
            AmqpReports(ingest, self.reports_queue),
        ):
            yield ingest

    async def step(self, ingest: Ingestor | None = None) -> None:
        """One pass: recompute when due, advance rollouts, clear removed devices, publish what is owed."""
        if ingest is not None:
            self.status.connected = ingest.connected
        try:
            await self._step()
        except Exception as e:
            self.status.error = f"controller pass failed: {type(e).__name__}: {e}"
            log.debug("controller pass failed", exc_info=True)
            self.warn(f"{self.status.error}; trying again in {self.interval_s:g} s")
        self.status.passes += 1

    async def _step(self) -> None:
        fleet, endpoint = self.fleet, self.endpoint
        now = asyncio.get_running_loop().time()
        if now - self._recomputed_at >= self.recompute_every_s:
            self._recomputed_at = now
            new = await asyncio.to_thread(fleet.recompute)
            if new:
                self.say(f"{new} new desired state(s): new devices or re-signed states")
        for line in await asyncio.to_thread(fleet.advance_rollouts, endpoint=endpoint):
            self.say(line)
        cleared = await asyncio.to_thread(fleet.clear_removed, endpoint)
        if cleared.cleared:
            self.say(f"cleared the retained messages of removed device(s) {', '.join(cleared.cleared)}")
        report = await asyncio.to_thread(fleet.publish_pending, endpoint)
        if report.published:
            self.say(f"published {report.published} pending desired state(s)")
        self.status.error = report.error or cleared.error

    def _rolling(self) -> bool:
        return any(d.rollout_state == "rolling" for d in self.fleet.list_deployments())
