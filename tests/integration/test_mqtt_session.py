"""The MQTT layer against real Mosquitto brokers: fail-over between nodes, clear errors, bulk publish.

Two brokers stand for two nodes of a cluster; a port nothing listens on stands for a dead node.
"""

from __future__ import annotations

import asyncio

import pytest

from edgemqtt.bulk import Retained, publish_retained
from edgemqtt.endpoint import BrokerUnavailable, Endpoint
from edgemqtt.session import Publication, Received, Session, SessionOptions
from tests.services import MosquittoFactory, free_port

pytestmark = pytest.mark.integration

WAIT_S = 20.0
FAST = SessionOptions(reconnect_min_s=0.1, reconnect_max_s=0.5, keepalive_s=5)


async def _receive(session: Session) -> Received:
    async for message in session.messages():
        return message
    raise AssertionError("unreachable")


async def test_a_session_skips_a_dead_node_and_fails_over_when_its_node_dies(
    mosquitto_factory: MosquittoFactory,
) -> None:
    first, second = mosquitto_factory(persistence=False), mosquitto_factory(persistence=False)
    dead = f"mqtt://127.0.0.1:{free_port()}"
    urls = [dead, f"mqtt://127.0.0.1:{first.port}", f"mqtt://127.0.0.1:{second.port}"]
    session = Session(Endpoint.parse(urls), client_id="failover", subscriptions=["t/#"], options=FAST)
    session.start()
    try:
        await session.wait_up(WAIT_S)
        live = {first.port: first, second.port: second}
        assert session.address.port in live  # not the dead node
        await session.publish(Publication("t/1", b"one"))
        assert (await asyncio.wait_for(_receive(session), WAIT_S)).payload == b"one"

        current = live.pop(session.address.port)
        (other,) = live.values()
        current.stop()
        for _ in range(int(WAIT_S / 0.1)):
            if session.is_up and session.address.port == other.port:
                break
            await asyncio.sleep(0.1)
        assert session.is_up and session.address.port == other.port
        await session.publish(Publication("t/2", b"two"))
        assert (await asyncio.wait_for(_receive(session), WAIT_S)).payload == b"two"
    finally:
        await session.close()


async def test_wait_up_says_which_nodes_cannot_be_reached() -> None:
    endpoint = Endpoint.parse([f"mqtt://127.0.0.1:{free_port()}", f"mqtt://127.0.0.1:{free_port()}"])
    session = Session(endpoint, client_id="nobody", subscriptions=[], options=FAST)
    session.start()
    try:
        with pytest.raises(BrokerUnavailable, match=r"cannot reach the MQTT broker at mqtt://127\.0\.0\.1:"):
            await session.wait_up(WAIT_S)
    finally:
        await session.close()


def test_bulk_publish_uses_the_first_node_that_answers(mosquitto_factory: MosquittoFactory) -> None:
    broker = mosquitto_factory(persistence=False)
    dead = f"mqtt://127.0.0.1:{free_port()}"
    messages = [Retained(f"bulk/{i}", str(i).encode()) for i in range(500)]
    outcome = publish_retained(Endpoint.parse([dead, f"mqtt://127.0.0.1:{broker.port}"]), messages)
    assert (outcome.acknowledged, outcome.error) == (500, None)

    nothing = publish_retained(Endpoint.parse(dead), messages)
    assert nothing.acknowledged == 0
    assert nothing.error is not None and dead in nothing.error
