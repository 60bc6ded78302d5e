"""Thousands of MQTT sessions in one process against a real Mosquitto: all connect, none takes a thread.

Bounded in time by generous timeouts; asserts that every client connected, received its retained
message and was acknowledged, not how fast.
"""

from __future__ import annotations

import asyncio
import resource
import threading

import pytest

from edgemqtt.endpoint import Endpoint
from edgemqtt.session import Connected, Publication, Received, Session, SessionOptions
from tests.services import MosquittoFactory

pytestmark = pytest.mark.integration

CLIENTS = 2000
WAIT_S = 240.0


def _need_files(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = count + 512
    if soft < wanted:
        if hard != resource.RLIM_INFINITY and hard < wanted:
            pytest.skip(f"REAL PART UNAVAILABLE: open files limit {hard} < {wanted}: raise ulimit -n")
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


async def test_2000_sessions_on_one_event_loop(mosquitto_factory: MosquittoFactory) -> None:
    _need_files(CLIENTS)
    # The broker inherits this process's raised limit; say so explicitly for its per-listener cap too.
    broker = mosquitto_factory("max_connections -1\n", persistence=False)
    endpoint = Endpoint.parse(f"mqtt://{broker.host}:{broker.port}")
    options = SessionOptions(keepalive_s=60, reconnect_max_s=5)
    threads_before = threading.active_count()

    def bridge(i: int) -> Session:
        topic = f"scale/{i}"
        return Session(
            endpoint,
            client_id=f"scale-{i}",
            options=options,
            subscriptions=[topic],
            will=lambda: Publication(f"{topic}/online", b"0", retain=True),
            birth=lambda: Publication(topic, f"hello {i}".encode(), retain=True),
        )

    bridges = [bridge(i) for i in range(CLIENTS)]

    async def session(i: int, b: Session) -> tuple[bool, bytes | None]:
        b.start()
        accepted, echoed = False, None
        while echoed is None:
            event = await b.next_event()
            if isinstance(event, Connected):
                accepted = accepted or not event.reason.is_failure
            elif isinstance(event, Received):
                echoed = event.payload  # the birth message, retained on its own subscribed topic
        await b.publish(Publication(f"scale/{i}/done", b"1", qos=1))
        return accepted, echoed

    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(session(i, b) for i, b in enumerate(bridges))), WAIT_S
        )
        threads_during = threading.active_count()
    finally:
        await asyncio.wait_for(asyncio.gather(*(b.close() for b in bridges)), WAIT_S)

    assert all(accepted for accepted, _ in results)
    assert [payload for _, payload in results] == [f"hello {i}".encode() for i in range(CLIENTS)]
    # Connects run on the loop's small executor; no client keeps a thread of its own.
    assert threads_during - threads_before < 40, (threads_before, threads_during)
