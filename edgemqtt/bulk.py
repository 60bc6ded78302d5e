"""Publish many retained QoS 1 messages over one MQTT 3.1.1 connection; report which were acknowledged.

This is the bulk path of the fleet (desired states, cleared retained messages of removed
devices). It writes the PUBLISH packets itself, many to one ``sendall``, and reads the PUBACKs in
bulk, keeping at most ``WINDOW`` messages unacknowledged. A paho ``publish`` per message (building
a message object, one ``send`` each, decoding each PUBACK into objects) cost more than signing the
message; this costs a few microseconds. Nothing else is sent on the connection, so the broker
answers only with PUBACKs (MQTT 3.1.1 sends them in the order the messages arrived).

Publishing never raises for the broker: whatever was not acknowledged is reported with the reason,
stays unpublished in the store and is sent again by the next ``publish_pending`` (``edgectl deploy
publish``, ``deploy watch``, ``edgectl serve`` or any later apply).

Blocking on purpose (one socket, a few large writes): the cloud's fleet service is synchronous and
calls it from a worker thread when on an event loop. With several broker nodes it connects to the
first that accepts. It speaks MQTT 3.1.1, which every broker of the project understands (RabbitMQ's
MQTT plugin included).
"""

from __future__ import annotations

import socket
import struct
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from edgemqtt.endpoint import Address, BrokerUnavailable, Endpoint

CONNECT_TIMEOUT_S = 5.0
KEEPALIVE_S = 30
WINDOW = 2000
ACK_TIMEOUT_S = 30.0
READ_SIZE = 1 << 16

_CONNACK_REASONS = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}
_PUBLISH_HEADER = b"\x33"  # PUBLISH, QoS 1, retain
_U16 = struct.Struct("!H").pack
_DISCONNECT = b"\xe0\x00"


class Retained(NamedTuple):
    """A message to publish retained with QoS 1; an empty payload clears the topic's retained message."""

    topic: str
    payload: bytes


@dataclass(frozen=True)
class PublishOutcome:
    """How many of the messages, in order, the broker acknowledged, and why not the rest."""

    acknowledged: int
    error: str | None = None


def publish_retained(
    endpoint: Endpoint, messages: Sequence[Retained], *, timeout_s: float = ACK_TIMEOUT_S
) -> PublishOutcome:
    """Publish ``messages`` in order; the first ``acknowledged`` of them reached the broker."""
    if not messages:
        return PublishOutcome(0)
    try:
        sock, address = _connect(endpoint)
    except BrokerUnavailable as e:
        return PublishOutcome(0, str(e))
    deadline = time.monotonic() + timeout_s
    sent = acked = 0
    buffer = b""
    reason = None
    try:
        while acked < len(messages):
            if sent < len(messages) and sent - acked < WINDOW:
                end = min(len(messages), acked + WINDOW)
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                sock.sendall(_publish_packets(messages, sent, end))
                sent = end
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                reason = f"no acknowledgement within {timeout_s:g} s"
                break
            sock.settimeout(remaining)
            data = sock.recv(READ_SIZE)
            if not data:
                reason = "the broker closed the connection"
                break
            buffer += data
            count, buffer, bad = _pubacks(buffer)
            if bad:
                reason = bad
                break
            acked += count
        if acked == len(messages):
            sock.sendall(_DISCONNECT)
    except TimeoutError:
        reason = f"no acknowledgement within {timeout_s:g} s"
    except OSError as e:  # ssl.SSLError included
        reason = f"connection lost: {e.strerror or e}"
    finally:
        sock.close()
    if acked == len(messages):
        return PublishOutcome(acked)
    return PublishOutcome(
        acked,
        f"the MQTT broker at {address.url} acknowledged {acked} of {len(messages)} messages ({reason})",
    )


def _publish_packets(messages: Sequence[Retained], start: int, end: int) -> bytes:
    """PUBLISH packets (QoS 1, retained) for ``messages[start:end]``, packet ids from the index."""
    parts: list[bytes] = []
    for i in range(start, end):
        topic, payload = messages[i]
        name = topic.encode()
        size = len(name) + len(payload) + 4
        parts += (_PUBLISH_HEADER, _varint(size), _U16(len(name)), name, _U16(i % 0xFFFF + 1), payload)
    return b"".join(parts)


def _pubacks(buffer: bytes) -> tuple[int, bytes, str | None]:
    """The number of whole PUBACKs in ``buffer``, the bytes after them, and what else came instead."""
    count = len(buffer) // 4
    whole = count * 4
    if buffer[0:whole:4] != b"\x40" * count or buffer[1:whole:4] != b"\x02" * count:
        return 0, buffer, f"a packet starting {buffer[:2].hex()} where only PUBACKs were expected"
    return count, buffer[whole:], None


def _varint(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    if n < 0x4000:
        return bytes((n & 0x7F | 0x80, n >> 7))
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(value: str) -> bytes:
    data = value.encode()
    return _U16(len(data)) + data


def _connect(endpoint: Endpoint) -> tuple[socket.socket, Address]:
    """A socket to the first node that accepts; BrokerUnavailable naming every node's failure."""
    errors: list[str] = []
    for address in endpoint.addresses:
        try:
            return _connect_node(endpoint, address), address
        except BrokerUnavailable as e:
            errors.append(str(e))
    raise BrokerUnavailable("; ".join(errors))


def _connect_node(endpoint: Endpoint, address: Address) -> socket.socket:
    """A socket with an accepted MQTT 3.1.1 clean session; BrokerUnavailable saying why not."""
    flags = 0x02
    payload = _string(f"edgectl-publish-{uuid.uuid4().hex[:12]}")
    if endpoint.username is not None:
        flags |= 0x80
        payload += _string(endpoint.username)
        if endpoint.password is not None:
            flags |= 0x40
            payload += _string(endpoint.password)
    body = b"\x00\x04MQTT\x04" + bytes((flags,)) + _U16(KEEPALIVE_S) + payload
    try:
        sock = socket.create_connection((address.host, address.port), timeout=CONNECT_TIMEOUT_S)
    except OSError as e:
        raise BrokerUnavailable(f"cannot reach the MQTT broker at {address.url}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if address.tls:
            sock = endpoint.tls_context().wrap_socket(sock, server_hostname=address.host)
        sock.sendall(b"\x10" + _varint(len(body)) + body)
        connack = b""
        while len(connack) < 4:
            data = sock.recv(4 - len(connack))
            if not data:
                break
            connack += data
    except TimeoutError:
        sock.close()
        raise BrokerUnavailable(
            f"the MQTT broker at {address.url} did not answer within {CONNECT_TIMEOUT_S:.0f} s"
        ) from None
    except OSError as e:  # ssl.SSLError included
        sock.close()
        raise BrokerUnavailable(f"cannot reach the MQTT broker at {address.url}: {e.strerror or e}") from None
    if len(connack) < 4 or connack[0] != 0x20 or connack[3] != 0:
        sock.close()
        why = _CONNACK_REASONS.get(connack[3], f"code {connack[3]}") if len(connack) == 4 else "no CONNACK"
        raise BrokerUnavailable(f"the MQTT broker at {address.url} refused the connection: {why}")
    return sock
