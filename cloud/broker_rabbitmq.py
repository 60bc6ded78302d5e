"""RabbitMQ (MQTT plugin) users and permissions for the fleet: one definitions file to import.

RabbitMQ's MQTT plugin maps topics onto the ``amq.topic`` exchange: ``/`` becomes ``.`` in routing
keys, and subscriptions become bindings (``+`` is ``*``, ``#`` stays ``#``). Topic authorisation
checks a publish's routing key against the user's *write* pattern and a subscription's binding
key against its *read* pattern, expanding ``{username}``; both patterns are generated here from
the same access rules the Mosquitto ACL is written from (``edgemqtt.topics``), so a device reads
only its own desired state and commands and writes only its own reports, online status and
command answers, on either broker.

Each device may also create, bind and consume only the subscription queues of its own client id
(``mqtt-subscription-<client id>qos0|1``), so a device that connects under another's client id
cannot subscribe to anything. The cloud's user may reach every device's topics (not ``$share``:
RabbitMQ 3.10 has none).

Passwords: RabbitMQ cannot read Mosquitto's PBKDF2 hashes, so ``edgectl device add`` stores a
second hash of the same random password in RabbitMQ's salted SHA-256 format
(``rabbit_password_hashing_sha256``; the passwords are 256-bit random tokens, so one round is as
strong as many). Import the file with ``rabbitmqctl import_definitions <file>`` on any node of the
cluster.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cloud.broker import BrokerPaths, cloud_credentials, write_atomic
from edgemqtt.topics import AclRule, cloud_acl, device_acl

DEFINITIONS_FILE = "rabbitmq-definitions.json"
REPORTS_QUEUE = "edge.reports"
"""The replicated (quorum) queue the cloud's workers share reports through (``cloud.fleet.amqp_reports``)."""
VHOST = "/"
EXCHANGE = "amq.topic"
HASHING = "rabbit_password_hashing_sha256"
USERNAME = "{username}"
"""RabbitMQ's placeholder for the connecting user in topic permissions."""
NODE_SETTINGS = (
    "mqtt.retained_message_store = rabbit_mqtt_retained_msg_store_ets",
    "cluster_partition_handling = pause_minority",
)
"""``rabbitmq.conf`` lines every node of a fleet's cluster wants: retained messages in memory (the
default DETS file costs a disk write per retained report, and the fleet's protocol never depends on
a node keeping them), and a minority side that pauses rather than diverges."""


def rabbit_password_hash(password: str, *, salt: bytes | None = None) -> str:
    """``base64(salt + sha256(salt + password))`` with a 4-byte salt: RabbitMQ's SHA-256 format."""
    salt = secrets.token_bytes(4) if salt is None else salt
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode("utf-8")).digest()).decode()


def key_pattern(topic_filter: str) -> str:
    """A regular expression (unanchored) over routing and binding keys for one MQTT topic filter.

    Each level is matched literally, ``+`` as one level (or the binding wildcard ``*``), ``#`` as
    the rest of the key; ``{username}`` is left for RabbitMQ to expand.
    """
    levels = []
    for level in topic_filter.split("/"):
        if level == "+":
            levels.append(r"[^.]+")
        elif level == "#":
            levels.append(r".+")
        else:
            levels.append(re.escape(level).replace(re.escape(USERNAME), USERNAME))
    return r"\.".join(levels)


def _pattern(rules: Iterable[AclRule], access: str) -> str:
    alternatives = [
        key_pattern(r.topic)
        for r in rules
        if r.access in (access, "readwrite") and not r.topic.startswith("$share/")
    ]
    return "^(" + "|".join(alternatives) + ")$" if alternatives else "^$"


def binding_key(topic_filter: str) -> str:
    """The AMQP binding key of an MQTT topic filter (``edge/+/reported`` → ``edge.*.reported``)."""
    return ".".join("*" if level == "+" else level for level in topic_filter.split("/"))


def routing_key_topic(routing_key: str) -> str:
    """The MQTT topic of a routing key RabbitMQ's MQTT plugin made: it swaps ``/`` and ``.``."""
    return routing_key.translate(_SWAP)


_SWAP = str.maketrans("./", "/.")


def _queues(client_id_pattern: str) -> str:
    return rf"^mqtt-subscription-{client_id_pattern}qos[01]$"


def render_definitions(
    device_hashes: Mapping[str, str], cloud_user: str, cloud_hash: str, *, vhost: str = VHOST
) -> dict[str, Any]:
    """A definitions document (users, permissions, topic permissions) for ``import_definitions``.

    ``device_hashes`` and ``cloud_hash`` are in ``rabbit_password_hash``'s format.
    """
    device_rules = device_acl(USERNAME)
    users: list[dict[str, Any]] = []
    permissions: list[dict[str, Any]] = []
    topic_permissions: list[dict[str, Any]] = []
    for name, password_hash in sorted(device_hashes.items()):
        queues = _queues(re.escape(name))
        users.append({"name": name, "password_hash": password_hash, "hashing_algorithm": HASHING, "tags": []})
        permissions.append(
            {
                "user": name,
                "vhost": vhost,
                "configure": queues,
                "write": f"^({re.escape(EXCHANGE)}|{queues[1:-1]})$",
                "read": f"^({re.escape(EXCHANGE)}|{queues[1:-1]})$",
            }
        )
        topic_permissions.append(
            {
                "user": name,
                "vhost": vhost,
                "exchange": EXCHANGE,
                "write": _pattern(device_rules, "write"),
                "read": _pattern(device_rules, "read"),
            }
        )
    cloud_queues = rf"^(mqtt-subscription-.+qos[01]|{re.escape(REPORTS_QUEUE)})$"
    users.append({"name": cloud_user, "password_hash": cloud_hash, "hashing_algorithm": HASHING, "tags": []})
    permissions.append(
        {
            "user": cloud_user,
            "vhost": vhost,
            "configure": cloud_queues,
            "write": f"^({re.escape(EXCHANGE)}|{cloud_queues[1:-1]})$",
            "read": f"^({re.escape(EXCHANGE)}|{cloud_queues[1:-1]})$",
        }
    )
    topic_permissions.append(
        {
            "user": cloud_user,
            "vhost": vhost,
            "exchange": EXCHANGE,
            "write": _pattern(cloud_acl(), "write"),
            "read": _pattern(cloud_acl(), "read"),
        }
    )
    return {
        "users": users,
        "vhosts": [{"name": vhost}],
        "permissions": permissions,
        "topic_permissions": topic_permissions,
    }


def left_out_reason(device: str, password_hash: str | None) -> str | None:
    """Why a device cannot have a RabbitMQ user (None: it can)."""
    if not password_hash:
        return "added before RabbitMQ hashes were kept: remove and add it again"
    if "." in device:
        # The MQTT plugin maps topic levels to AMQP words with '.': a dotted id breaks its topics
        # and the {username} topic permissions.
        return "a '.' in the device id cannot be used on RabbitMQ's MQTT plugin"
    return None


def write_definitions(
    paths: BrokerPaths, hashes: Mapping[str, str | None], out: Path | None = None
) -> tuple[Path, dict[str, str]]:
    """Write the definitions file (mode 0600: it holds password hashes); where, and the devices
    left out with the reason (``left_out_reason``). BrokerError when the file cannot be written.
    """
    user, password = cloud_credentials(paths)
    left_out = {d: why for d, h in sorted(hashes.items()) if (why := left_out_reason(d, h))}
    known = {d: h for d, h in hashes.items() if h and d not in left_out}
    document = render_definitions(known, user, rabbit_password_hash(password))
    target = out or paths.root / DEFINITIONS_FILE
    write_atomic(target, json.dumps(document, indent=2) + "\n", 0o600)
    return target, left_out
