"""The fleet's topic scheme: the only place topic strings are spelled.

Topics (QoS 1), with ``{d}`` the device id, which is also its MQTT username:

============================  ============  ========  ==========================================
topic                         written by    retained  payload
============================  ============  ========  ==========================================
``edge/{d}/desired``          cloud         yes       DesiredState (signed)
``edge/{d}/reported``         agent         yes       ReportedState
``edge/{d}/heartbeat``        agent         no        Heartbeat (between full reports)
``edge/{d}/online``           agent (will)  yes       OnlineStatus (birth announces the generation)
``edge/{d}/cmd/req/{id}``     cloud         no        CommandRequest
``edge/{d}/cmd/res/{id}``     agent         no        CommandResponse
============================  ============  ========  ==========================================

Builders refuse a device or command id that would change a topic's shape (``/``, ``+``, ``#``,
empty). ``parse`` is their inverse: ``DeviceTopic`` for any topic of the scheme, None otherwise.
``device_acl``/``cloud_acl`` give the access rules brokers enforce, with the device's username
written as the broker's placeholder (``%u`` for Mosquitto, ``{username}`` for RabbitMQ).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ROOT = "edge"
SHARE_GROUP = "cloud"
"""The shared-subscription group the cloud's workers split reports in (``$share/cloud/...``)."""

Kind = Literal["desired", "reported", "heartbeat", "online", "cmd/req", "cmd/res"]
Access = Literal["read", "write", "readwrite"]

DEVICE_PLACEHOLDER = "{device}"
"""Stands for the device id in ``AclRule.topic``; ``device_acl`` replaces it with the broker's own."""

_FORBIDDEN = frozenset("/+#\0")


def _segment(value: str, what: str) -> str:
    if not value or any(c in _FORBIDDEN for c in value):
        raise ValueError(f"{what} {value!r} cannot be a topic level (empty, or holds '/', '+', '#')")
    return value


def _device(device: str) -> str:
    return f"{ROOT}/{_segment(device, 'device id')}"


def desired(device: str) -> str:
    """``edge/{d}/desired``: the device's signed desired state (retained)."""
    return f"{_device(device)}/desired"


def reported(device: str) -> str:
    """``edge/{d}/reported``: what the device reports (retained)."""
    return f"{_device(device)}/reported"


def heartbeat(device: str) -> str:
    """``edge/{d}/heartbeat``: the device's small "nothing changed" message (not retained)."""
    return f"{_device(device)}/heartbeat"


def online(device: str) -> str:
    """``edge/{d}/online``: the device's birth, farewell and last will (retained)."""
    return f"{_device(device)}/online"


def command_request(device: str, command_id: str) -> str:
    """``edge/{d}/cmd/req/{id}``: one command to the device."""
    return f"{_device(device)}/cmd/req/{_segment(command_id, 'command id')}"


def command_response(device: str, command_id: str) -> str:
    """``edge/{d}/cmd/res/{id}``: the device's answer to command ``id``."""
    return f"{_device(device)}/cmd/res/{_segment(command_id, 'command id')}"


def command_requests(device: str) -> str:
    """The filter of every command request to the device (``edge/{d}/cmd/req/+``)."""
    return f"{_device(device)}/cmd/req/+"


ALL_REPORTED = f"{ROOT}/+/reported"
"""Every device's reports."""
ALL_HEARTBEATS = f"{ROOT}/+/heartbeat"
"""Every device's heartbeats."""
ALL_ONLINE = f"{ROOT}/+/online"
"""Every device's online messages."""


def shared(topic_filter: str, group: str = SHARE_GROUP) -> str:
    """``$share/{group}/{filter}``: one subscriber of the group gets each message (MQTT 5, Mosquitto 2)."""
    return f"$share/{_segment(group, 'share group')}/{topic_filter}"


@dataclass(frozen=True)
class DeviceTopic:
    """A parsed topic of the scheme: whose, which kind, and the command id of ``cmd/*`` topics."""

    device: str
    kind: Kind
    command_id: str | None = None


def parse(topic: str) -> DeviceTopic | None:
    """The ``DeviceTopic`` of ``topic``, or None when it is not one of the scheme's topics."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != ROOT or not parts[1] or parts[1] in ("+", "#"):
        return None
    device = parts[1]
    if len(parts) == 3 and parts[2] in ("desired", "reported", "heartbeat", "online"):
        return DeviceTopic(device, parts[2])  # type: ignore[arg-type]
    if len(parts) == 5 and parts[2] == "cmd" and parts[3] in ("req", "res") and parts[4]:
        if parts[4] in ("+", "#"):
            return None
        return DeviceTopic(device, f"cmd/{parts[3]}", parts[4])  # type: ignore[arg-type]
    return None


def _pattern(device: str, rest: str) -> str:
    """A topic filter of the scheme, unchecked (for ACL rules: wildcards and placeholders)."""
    return f"{ROOT}/{device}/{rest}"


@dataclass(frozen=True)
class AclRule:
    """One access rule: ``access`` to ``topic`` (a filter; ``{device}`` is the device's own id)."""

    access: Access
    topic: str


DEVICE_RULES = (
    AclRule("read", _pattern(DEVICE_PLACEHOLDER, "desired")),
    AclRule("read", _pattern(DEVICE_PLACEHOLDER, "cmd/req/#")),
    AclRule("write", _pattern(DEVICE_PLACEHOLDER, "reported")),
    AclRule("write", _pattern(DEVICE_PLACEHOLDER, "heartbeat")),
    # Read too: an agent watches its own online topic to see another client take its id over.
    AclRule("readwrite", _pattern(DEVICE_PLACEHOLDER, "online")),
    AclRule("write", _pattern(DEVICE_PLACEHOLDER, "cmd/res/#")),
)
"""What a device may do: read its own desired state and commands, write its own reports."""

CLOUD_RULES = (
    AclRule("write", _pattern("+", "desired")),
    AclRule("write", _pattern("+", "cmd/req/#")),
    # The cloud writes a removed device's reported/online only to clear their retained messages.
    AclRule("readwrite", ALL_REPORTED),
    # Mosquitto 2 checks delivery against the real topic; brokers that check the filter need this.
    AclRule("read", shared(ALL_REPORTED)),
    AclRule("read", ALL_HEARTBEATS),
    AclRule("read", shared(ALL_HEARTBEATS)),
    AclRule("readwrite", ALL_ONLINE),
    AclRule("read", _pattern("+", "cmd/res/#")),
)
"""What the cloud's user may do: write desired states and commands, read everything devices send."""


def device_acl(placeholder: str) -> list[AclRule]:
    """``DEVICE_RULES`` with the device id written as the broker's username placeholder."""
    return [
        AclRule(rule.access, rule.topic.replace(DEVICE_PLACEHOLDER, placeholder)) for rule in DEVICE_RULES
    ]


def cloud_acl() -> list[AclRule]:
    """``CLOUD_RULES``, as a list."""
    return list(CLOUD_RULES)
