"""Admission of a desired-state message: the checks it must pass before the agent acts on it.

``admit`` is pure apart from the signature check. The order of the checks is deliberate:

1. size and JSON parsing, then the schema: nothing else can be read from a broken document;
2. the device id: a message meant for another device is a routing mistake the operator must see
   named as such (every device verifies with the same cloud key, so the signature would pass);
3. the signature: before anything is concluded from the generation or expiry, they must be
   authentic; a forged or tampered document is reported as a signature failure, nothing more;
4. the generation, then expiry: both only mean something for a genuine document, and a replay
   of an old signed state is reported as stale rather than expired.

A rejection raises ``Rejected``; the agent reports its reason and changes nothing.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import orjson
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from modules.contract import DesiredState, RejectionCode, format_validation_error
from modules.signing import SignatureError, verify_desired

MAX_BYTES = 1 << 20


class Rejected(Exception):
    """A desired state the agent will not apply; ``reason`` is what to report.

    ``code`` names the failed check; ``generation`` is the received generation when it could be
    read (for ``generation_received`` in the report). A ``generation`` rejection whose generation
    equals the applied one is usually the broker redelivering the retained message after a
    reconnect: see ``is_redelivery``.
    """

    def __init__(self, code: RejectionCode, reason: str, *, generation: int | None = None) -> None:
        super().__init__(reason)
        self.code: RejectionCode = code
        self.reason = reason
        self.generation = generation

    def is_redelivery(self, applied_generation: int) -> bool:
        """True when this is the already applied generation arriving again (nothing to report)."""
        return self.code == "generation" and self.generation == applied_generation


def admit(
    raw: bytes | str,
    *,
    device_id: str,
    last_generation: int,
    public_key: Ed25519PublicKey,
    now: datetime,
    leeway_s: float = 0.0,
    max_bytes: int = MAX_BYTES,
) -> DesiredState:
    """Parse and check a desired-state message; returns it, or raises ``Rejected`` with the reason.

    ``last_generation`` is the newest generation applied so far (0 before any); ``leeway_s``
    tolerates that much clock difference when checking expiry.
    """
    data = raw.encode() if isinstance(raw, str) else raw
    if len(data) > max_bytes:
        raise Rejected("too_large", f"too large: {len(data)} bytes, the limit is {max_bytes}")
    try:
        doc: Any = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise Rejected("not_json", f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise Rejected("schema", f"schema: (document): expected a JSON object, got {type(doc).__name__}")
    try:
        state = DesiredState.model_validate(doc)
    except ValidationError as e:
        lines = format_validation_error(e).splitlines()
        raise Rejected("schema", "schema: " + "; ".join(lines)) from None
    generation = state.generation
    if state.device_id != device_id:
        raise Rejected(
            "device",
            f"desired state is for device {state.device_id!r}, this is {device_id!r}",
            generation=generation,
        )
    try:
        verify_desired(state, public_key)
    except SignatureError as e:
        raise Rejected("signature", f"signature: {e}", generation=generation) from None
    if generation <= last_generation:
        raise Rejected(
            "generation",
            f"generation {generation} is not newer than applied generation {last_generation}",
            generation=generation,
        )
    if now >= state.expires_at + timedelta(seconds=leeway_s):
        raise Rejected(
            "expired",
            f"expired at {state.expires_at.isoformat()} (device time {now.isoformat()})",
            generation=generation,
        )
    return state
