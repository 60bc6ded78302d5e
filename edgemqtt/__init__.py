"""The fleet's one MQTT layer, shared by the agent and the cloud (never imported by ``modules``).

- ``topics``: the topic scheme (build, parse, ACL rules): the only place topic strings are spelled;
- ``endpoint``: broker URLs (several nodes for fail-over), TLS and credentials: the one parser;
- ``session``: one asyncio session on paho (callbacks only fill a queue and resolve futures);
- ``bulk``: many retained QoS 1 messages over one MQTT 3.1.1 connection, packets written by hand.
"""

from edgemqtt.endpoint import Address, BrokerUnavailable, Endpoint
from edgemqtt.session import Publication, PublishRefused, Received, Session, SessionOptions

__all__ = [
    "Address",
    "BrokerUnavailable",
    "Endpoint",
    "Publication",
    "PublishRefused",
    "Received",
    "Session",
    "SessionOptions",
]
