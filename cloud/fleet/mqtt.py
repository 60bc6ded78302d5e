"""How the cloud reaches the MQTT broker: the endpoint, and paho clients connected to it.

The broker URL comes from ``--broker-url``, else ``$EDGE_BROKER_URL``, else the cloud's URL that
``edgectl broker config`` saved in the data directory (its loopback listener for the cloud, where
client ids are not bound to usernames), else ``mqtt://127.0.0.1:1883``. Credentials
come from the URL (``mqtt://user:pass@host``) or, when the data directory holds broker files, are
the cloud's own user (``_cloud`` and ``broker/cloud.password``).

Clients use paho-mqtt 2.x with the VERSION2 callback API and MQTT 5 (shared subscriptions); the
bulk publisher (``publisher.py``) writes its MQTT 3.1.1 packets itself.
"""

from __future__ import annotations

import os
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud import broker

BROKER_URL_ENV = "EDGE_BROKER_URL"
DEFAULT_BROKER_URL = "mqtt://127.0.0.1:1883"
CONNECT_TIMEOUT_S = 5.0
KEEPALIVE_S = 30


class BrokerUnavailable(Exception):
    """The broker cannot be reached or refused the connection; the message says which and where."""


@dataclass(frozen=True)
class Endpoint:
    """A broker address with the credentials and TLS settings to use."""

    host: str
    port: int
    tls: bool = False
    ca_file: Path | None = None
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str, *, ca_file: Path | None = None) -> Endpoint:
        """``mqtt://[user[:pass]@]host[:port]`` or ``mqtts://...``; ValueError naming the URL."""
        parts = urlsplit(url)
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
            raise ValueError(f"broker URL {url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"broker URL {url!r}: bad port") from None
        tls = parts.scheme == "mqtts"
        return cls(
            host=parts.hostname,
            port=port or (8883 if tls else 1883),
            tls=tls,
            ca_file=ca_file,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    @property
    def url(self) -> str:
        """The URL without credentials, for messages."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def resolve_endpoint(data_dir: Path, url: str | None = None) -> Endpoint:
    """The broker endpoint for a data directory (see the module docstring for the precedence)."""
    paths = broker.BrokerPaths.of(data_dir)
    saved = broker.load_settings(paths)
    chosen = url or os.environ.get(BROKER_URL_ENV)
    if chosen is not None or saved is None:
        endpoint = Endpoint.parse(chosen or DEFAULT_BROKER_URL, ca_file=saved.ca_file if saved else None)
    elif saved.cloud_url is not None:  # the broker's loopback listener for the cloud
        endpoint = Endpoint.parse(saved.cloud_url)
    else:
        endpoint = Endpoint.parse(saved.url, ca_file=saved.ca_file)
    if endpoint.username is None and paths.cloud_password_file.is_file():
        user, password = broker.cloud_credentials(paths)
        endpoint = Endpoint(endpoint.host, endpoint.port, endpoint.tls, endpoint.ca_file, user, password)
    return endpoint


def new_client(
    endpoint: Endpoint,
    prefix: str,
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv5,
    *,
    client_id: str | None = None,
) -> mqtt.Client:
    """A paho client (VERSION2 callbacks, MQTT 5 unless told) with the endpoint's credentials and TLS.

    The client id is ``client_id`` or ``prefix`` plus a random suffix.
    """
    client = mqtt.Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id or f"{prefix}-{uuid.uuid4().hex[:12]}",
        protocol=protocol,
    )
    if endpoint.username is not None:
        client.username_pw_set(endpoint.username, endpoint.password)
    if endpoint.tls:
        client.tls_set_context(tls_context(endpoint))
    return client


def tls_context(endpoint: Endpoint) -> ssl.SSLContext:
    """The TLS context for ``mqtts://``: the endpoint's CA file, else the system's trust store."""
    return ssl.create_default_context(cafile=str(endpoint.ca_file) if endpoint.ca_file else None)


def connect(
    client: mqtt.Client,
    endpoint: Endpoint,
    timeout_s: float = CONNECT_TIMEOUT_S,
    on_connected: Callable[[mqtt.Client], object] | None = None,
    session_expiry_s: int = 0,
) -> None:
    """Connect and start paho's network thread; BrokerUnavailable when refused or unreachable.

    ``on_connected`` runs on paho's thread after every successful connection, reconnects included
    (the place to subscribe). paho reconnects by itself after a lost connection. With
    ``session_expiry_s`` (MQTT 5) the broker keeps the session, and queues QoS 1 messages for it,
    that long after a disconnect; a later client with the same id resumes it.
    """
    answered = threading.Event()
    outcome: list[str] = []

    def on_connect(
        c: mqtt.Client, _u: object, _f: mqtt.ConnectFlags, reason: mqtt.ReasonCode, _p: object
    ) -> None:
        if reason.is_failure:
            outcome.append(str(reason))
        elif on_connected is not None:
            on_connected(c)
        answered.set()

    client.on_connect = on_connect
    try:
        if session_expiry_s:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = session_expiry_s
            client.connect(
                endpoint.host, endpoint.port, keepalive=KEEPALIVE_S, clean_start=False, properties=properties
            )
        else:
            client.connect(endpoint.host, endpoint.port, keepalive=KEEPALIVE_S)
    except (OSError, ssl.SSLError) as e:
        raise BrokerUnavailable(
            f"cannot reach the MQTT broker at {endpoint.url}: {e.strerror or e}"
        ) from None
    client.loop_start()
    if not answered.wait(timeout_s):
        client.loop_stop()
        raise BrokerUnavailable(f"the MQTT broker at {endpoint.url} did not answer within {timeout_s:.0f} s")
    if outcome:
        client.loop_stop()
        raise BrokerUnavailable(f"the MQTT broker at {endpoint.url} refused the connection: {outcome[0]}")


def disconnect(client: mqtt.Client) -> None:
    """Disconnect cleanly and stop the network thread."""
    client.disconnect()
    client.loop_stop()
