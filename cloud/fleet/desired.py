"""Per-device desired states: their content, when the generation moves, and signed payloads. Pure.

The *content* of a desired state is everything the agent acts on (deployment name, modules,
registry credentials, rollback policy, health deadline); generation, timestamps and signature are
not content. A device gets a new generation, and a new message, only when the hash of its content
changes: re-applying an unchanged deployment publishes nothing.

``Renderer`` builds the signed JSON payloads. Devices that share content (same deployment, same
profile) share one validated template, so only the device id, the generation and the signature
are computed per device.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modules.contract import DesiredModule, DesiredState, RegistryCredentialRef, canonical_json

DEFAULT_TTL = timedelta(days=30)


@dataclass(frozen=True)
class DesiredContent:
    """What a device must run; ``deployment=None`` with no modules means "run nothing"."""

    deployment: str | None
    modules: Mapping[str, DesiredModule] = field(default_factory=dict)
    rollback: Literal["auto", "none"] = "auto"
    health_deadline_s: float = 120.0
    registry_credentials: Sequence[RegistryCredentialRef] = ()

    def to_json(self) -> dict[str, Any]:
        """The content as JSON-ready data (stored for reverts, hashed for change detection)."""
        return {
            "deployment": self.deployment,
            "modules": {name: m.model_dump(mode="json") for name, m in sorted(self.modules.items())},
            "rollback": self.rollback,
            "health_deadline_s": self.health_deadline_s,
            "registry_credentials": [
                c.model_dump(mode="json", exclude={"sealed"}) for c in self.registry_credentials
            ],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> DesiredContent:
        """The inverse of ``to_json`` (validates the modules again)."""
        return cls(
            deployment=data.get("deployment"),
            modules={n: DesiredModule.model_validate(m) for n, m in data.get("modules", {}).items()},
            rollback=data.get("rollback", "auto"),
            health_deadline_s=float(data.get("health_deadline_s", 120.0)),
            registry_credentials=tuple(
                RegistryCredentialRef.model_validate(c) for c in data.get("registry_credentials", [])
            ),
        )

    @property
    def hash(self) -> str:
        """sha256 of the canonical JSON of the content."""
        return content_hash(self.to_json())


EMPTY = DesiredContent(deployment=None)
"""The content of a device no deployment selects any more: stop and remove every module."""


def content_hash(data: Mapping[str, Any]) -> str:
    """sha256 hex of canonical JSON."""
    return hashlib.sha256(canonical_json(dict(data))).hexdigest()


def content_from_payload(payload: str | bytes) -> DesiredContent:
    """The content of a stored signed desired state."""
    state = DesiredState.model_validate_json(payload)
    return DesiredContent(
        deployment=state.deployment,
        modules=state.modules,
        rollback=state.rollback,
        health_deadline_s=state.health_deadline_s,
        registry_credentials=tuple(c.model_copy(update={"sealed": None}) for c in state.registry_credentials),
    )


def next_generation(previous: tuple[int, str] | None, new_hash: str) -> int | None:
    """The generation to publish for content ``new_hash`` after ``(generation, hash)``; None: unchanged."""
    if previous is None:
        return 1
    generation, old_hash = previous
    return None if old_hash == new_hash else generation + 1


Sealer = Callable[[str, RegistryCredentialRef], RegistryCredentialRef]
"""``(device id, credential)`` → the credential with its password sealed to that device."""


class Renderer:
    """Signs desired states issued at one instant; caches one validated template per content.

    Content with registry credentials is rendered per device instead: ``sealer`` seals each
    credential's password to the device, so no two devices' states share those bytes.
    """

    def __init__(
        self,
        key: Ed25519PrivateKey,
        issued_at: datetime,
        ttl: timedelta = DEFAULT_TTL,
        sealer: Sealer | None = None,
    ) -> None:
        if issued_at.tzinfo is None:
            raise ValueError("issued_at needs a timezone")
        self.sealer = sealer
        self.key = key
        self.issued_at = issued_at
        self.expires_at = issued_at + ttl
        self._templates: dict[str, tuple[bytes, bytes, bytes]] = {}

    def state(self, device_id: str, generation: int, content: DesiredContent) -> DesiredState:
        """The unsigned, validated DesiredState of one device."""
        return DesiredState(
            device_id=device_id,
            generation=generation,
            issued_at=self.issued_at,
            expires_at=self.expires_at,
            deployment=content.deployment,
            modules=dict(content.modules),
            registry_credentials=list(content.registry_credentials),
            rollback=content.rollback,
            health_deadline_s=content.health_deadline_s,
        )

    def payload(self, device_id: str, generation: int, content: DesiredContent, content_key: str) -> bytes:
        """The signed DesiredState of one device as canonical JSON; ``content_key`` is ``content.hash``.

        The canonical JSON of the content's template is rendered once with placeholder id and
        generation and split around them; per device only the pieces are joined (the id encoded by
        orjson, which escapes a string exactly as ``canonical_json`` does) and signed. The result
        is byte for byte ``canonical_json`` of the state (the signature sorts last).
        """
        if content.registry_credentials:
            return self._sealed_payload(device_id, generation, content)
        pieces = self._templates.get(content_key)
        if pieces is None:
            pieces = self._template(content)
            self._templates[content_key] = pieces
        head, middle, tail = pieces
        return self._signed(b"".join((head, orjson.dumps(device_id), middle, b"%d" % generation, tail)))

    def _sealed_payload(self, device_id: str, generation: int, content: DesiredContent) -> bytes:
        sealer = self.sealer
        credentials = [sealer(device_id, c) if sealer else c for c in content.registry_credentials]
        state = self.state(device_id, generation, content).model_copy(
            update={"registry_credentials": credentials}
        )
        return self._signed(state.canonical_bytes())

    def _signed(self, unsigned: bytes) -> bytes:
        """``unsigned`` canonical JSON with its signature added (it sorts last)."""
        signature = base64.b64encode(self.key.sign(unsigned))
        return b"".join((unsigned[:-1], b',"signature":"', signature, b'"}'))

    def _template(self, content: DesiredContent) -> tuple[bytes, bytes, bytes]:
        doc = self.state(_ID_PLACEHOLDER, _GENERATION_PLACEHOLDER, content).signed_document()
        rendered = canonical_json(doc)
        id_at = rendered.index(_ID_MARK)
        generation_at = rendered.index(_GENERATION_MARK)
        if id_at > generation_at or rendered.count(_ID_MARK) != 1 or rendered.count(_GENERATION_MARK) != 1:
            raise AssertionError("desired-state template placeholders are not unique")
        head = rendered[: id_at + len(b'"device_id":')]
        middle = rendered[id_at + len(_ID_MARK) : generation_at + len(b'"generation":')]
        tail = rendered[generation_at + len(_GENERATION_MARK) :]
        return head, middle, tail


_ID_PLACEHOLDER = "device-id-placeholder"
_GENERATION_PLACEHOLDER = 918273645546372819
_ID_MARK = b'"device_id":"' + _ID_PLACEHOLDER.encode() + b'"'
_GENERATION_MARK = b'"generation":' + str(_GENERATION_PLACEHOLDER).encode()
