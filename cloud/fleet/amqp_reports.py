"""Reports through RabbitMQ's own competing-consumer queue: a quorum queue read over AMQP.

RabbitMQ 3.10's MQTT plugin has no shared subscriptions. Its MQTT messages are AMQP messages on
``amq.topic`` (topic ``edge/d/reported`` is routing key ``edge.d.reported``), so the cloud's
workers bind one replicated quorum queue (``edge.reports``) to ``edge.*.reported`` and
``edge.*.heartbeat`` and consume it together: RabbitMQ hands each report to one worker, and a
worker that dies (or loses its node) leaves its unacknowledged reports to the others. Reports go
into the worker's ``Ingestor`` (``subscribe_reports=False``: it still takes online messages over
MQTT) and are acknowledged only after the ingester wrote them (at least once; newer-wins makes a
redelivered report harmless).

``AmqpReports(ingest, urls)`` connects to the first node of ``urls`` (``amqp://user:pass@host:port``)
that answers, and to the next one when the connection is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from types import TracebackType

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from cloud.broker_rabbitmq import EXCHANGE, REPORTS_QUEUE, binding_key, routing_key_topic
from cloud.fleet.ingest import Ingestor, log_crash
from edgemqtt import topics

log = logging.getLogger(__name__)

PREFETCH = 2000
"""Reports a worker holds unacknowledged (RabbitMQ redelivers them to another worker if it dies)."""
ACK_INTERVAL_S = 0.1
RETRY_S = 1.0
CONNECT_TIMEOUT_S = 10.0


class AmqpReports:
    """``async with AmqpReports(ingest, urls)``: consume the shared reports queue into ``ingest``."""

    def __init__(
        self,
        ingest: Ingestor,
        urls: Sequence[str],
        *,
        prefetch: int = PREFETCH,
        ack_interval_s: float = ACK_INTERVAL_S,
    ) -> None:
        if not urls:
            raise ValueError("no AMQP URL given")
        self.ingest = ingest
        self.urls = list(urls)
        self.prefetch = prefetch
        self.ack_interval_s = ack_interval_s
        self.consuming = asyncio.Event()
        """Set while the queue is being consumed."""
        self.acknowledged = 0
        self._unacked: list[AbstractIncomingMessage] = []
        self._task: asyncio.Task[None] | None = None
        self._connection: aio_pika.abc.AbstractConnection | None = None

    async def __aenter__(self) -> AmqpReports:
        self._task = asyncio.create_task(self._run(), name="amqp-reports")
        self._task.add_done_callback(log_crash)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def abort(self) -> None:
        """Drop the connection without acknowledging anything (what a crashed worker leaves behind)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        node = 0
        while True:
            url = self.urls[node]
            try:
                await self._consume(url)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # unreachable, refused, connection lost: the next node
                self.consuming.clear()
                log.warning(
                    "reports queue on %s: %s; trying the next node in %g s",
                    _redact(url),
                    f"{type(e).__name__}: {e}",
                    RETRY_S,
                )
            node = (node + 1) % len(self.urls)
            await asyncio.sleep(RETRY_S)

    async def _consume(self, url: str) -> None:
        connection = await aio_pika.connect(url, timeout=CONNECT_TIMEOUT_S)
        self._connection = connection
        self._unacked = []
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=self.prefetch)
            queue = await declare_reports_queue(channel)
            await queue.consume(self._received)
            self.consuming.set()
            log.info("consuming reports from queue %s on %s", REPORTS_QUEUE, _redact(url))
            closed = asyncio.Event()
            connection.close_callbacks.add(lambda *_: closed.set())
            while not closed.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(closed.wait(), self.ack_interval_s)
                await self._acknowledge()
            raise ConnectionError("the connection was closed")
        finally:
            self.consuming.clear()
            self._unacked = []  # unacknowledged deliveries go back to the queue with the connection
            with contextlib.suppress(Exception):
                await connection.close()

    async def _received(self, message: AbstractIncomingMessage) -> None:
        self.ingest.accept(routing_key_topic(message.routing_key or ""), message.body)
        self._unacked.append(message)

    async def _acknowledge(self) -> None:
        """Acknowledge everything received so far once the ingester wrote it."""
        if not self._unacked:
            return
        taken, self._unacked = self._unacked, []
        if not await self.ingest.flush_now():
            self._unacked = taken + self._unacked  # the store refused: keep them unacknowledged
            return
        await taken[-1].ack(multiple=True)
        self.acknowledged += len(taken)


async def declare_reports_queue(channel: aio_pika.abc.AbstractChannel) -> aio_pika.abc.AbstractQueue:
    """The shared quorum queue, declared (idempotent) and bound to every device's reports and heartbeats."""
    queue = await channel.declare_queue(REPORTS_QUEUE, durable=True, arguments={"x-queue-type": "quorum"})
    await queue.bind(EXCHANGE, routing_key=binding_key(topics.ALL_REPORTED))
    await queue.bind(EXCHANGE, routing_key=binding_key(topics.ALL_HEARTBEATS))
    return queue


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    return f"{scheme}{sep}{rest.rpartition('@')[2]}"
