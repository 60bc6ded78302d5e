"""Admission of desired-state messages: every rejection with its exact reason, and check order."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.admission import Rejected, admit
from modules.contract import DesiredState
from modules.signing import generate_keypair, load_private_key, load_public_key, sign_desired

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
PRIVATE_PEM, PUBLIC_PEM = generate_keypair()
PRIVATE: Ed25519PrivateKey = load_private_key(PRIVATE_PEM)
PUBLIC: Ed25519PublicKey = load_public_key(PUBLIC_PEM)


def doc(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "device_id": "dev1",
        "generation": 5,
        "issued_at": "2026-03-01T11:00:00Z",
        "expires_at": "2026-03-02T11:00:00Z",
        "modules": {"web": {"image": "localhost:5000/web:1", "ports": [{"container": 5001, "host": 8080}]}},
    }
    base.update(changes)
    return base


def signed(key: Ed25519PrivateKey = PRIVATE, **changes: Any) -> bytes:
    state = sign_desired(DesiredState.model_validate(doc(**changes)), key)
    return state.model_dump_json().encode()


def check(raw: bytes | str, last_generation: int = 4, now: datetime = NOW, **kw: Any) -> DesiredState:
    return admit(raw, device_id="dev1", last_generation=last_generation, public_key=PUBLIC, now=now, **kw)


def rejection(raw: bytes | str, **kw: Any) -> Rejected:
    with pytest.raises(Rejected) as info:
        check(raw, **kw)
    return info.value


def test_a_good_state_is_admitted() -> None:
    state = check(signed())
    assert (state.device_id, state.generation, list(state.modules)) == ("dev1", 5, ["web"])
    assert state.modules["web"].ports[0].host == 8080


def test_a_str_payload_is_admitted_too() -> None:
    assert check(signed().decode()).generation == 5


def test_first_state_after_install() -> None:
    assert check(signed(generation=1), last_generation=0).generation == 1


REJECTIONS = {
    "not JSON": (b'{"device_id": ', "not_json", "not JSON: "),
    "not UTF-8": (b"\xff\xfe{}", "not_json", "not JSON: "),
    "not an object": (b"[1, 2]", "schema", "schema: (document): expected a JSON object, got list"),
    "missing field": (
        orjson.dumps({k: v for k, v in doc().items() if k != "device_id"}),
        "schema",
        "schema: device_id: Field required",
    ),
    "bad port": (
        orjson.dumps(doc(modules={"web": {"image": "localhost:5000/web:1", "ports": [{"container": 0}]}})),
        "schema",
        "schema: modules.web.ports.0.container: Input should be greater than or equal to 1",
    ),
    "two problems on one line": (
        orjson.dumps(doc(generation=0, device_id="Dev 1")),
        "schema",
        "schema: device_id: 'Dev 1' is not a valid name: use 1-63 lowercase letters, digits, '-', '_' "
        "or '.', starting with a letter or digit; generation: Input should be greater than or equal to 1",
    ),
    "naive timestamp": (
        orjson.dumps(doc(expires_at="2026-03-02T11:00:00")),
        "schema",
        "schema: expires_at: timestamp needs a timezone (use UTC, e.g. 2026-01-01T00:00:00Z)",
    ),
    "another device": (
        signed(device_id="dev2"),
        "device",
        "desired state is for device 'dev2', this is 'dev1'",
    ),
    "unsigned": (
        orjson.dumps(doc()),
        "signature",
        "signature: missing: the desired state carries no signature",
    ),
    "signature not base64": (
        orjson.dumps(doc(signature="not base64!")),
        "signature",
        "signature: malformed: not base64 (",
    ),
    "signature too short": (
        orjson.dumps(doc(signature="AAAA")),
        "signature",
        "signature: malformed: 3 bytes, an Ed25519 signature has 64",
    ),
    "signed by another key": (
        signed(key=Ed25519PrivateKey.generate()),
        "signature",
        "signature: mismatch: not signed by the configured cloud key, or changed after signing",
    ),
    "same generation": (
        signed(generation=4),
        "generation",
        "generation 4 is not newer than applied generation 4",
    ),
    "older generation": (
        signed(generation=3),
        "generation",
        "generation 3 is not newer than applied generation 4",
    ),
    "expired": (
        signed(expires_at="2026-03-01T11:30:00Z"),
        "expired",
        "expired at 2026-03-01T11:30:00+00:00 (device time 2026-03-01T12:00:00+00:00)",
    ),
}


@pytest.mark.parametrize(("raw", "code", "reason"), REJECTIONS.values(), ids=REJECTIONS.keys())
def test_rejections(raw: bytes, code: str, reason: str) -> None:
    err = rejection(raw)
    assert err.code == code
    if reason.endswith((": ", "(")):  # the rest is the parser's own words
        assert err.reason.startswith(reason)
    else:
        assert err.reason == reason
    assert str(err) == err.reason


def test_tampering_with_one_byte_is_caught() -> None:
    raw = signed()
    tampered = raw.replace(b'"host":8080', b'"host":8081')
    assert tampered != raw
    assert rejection(tampered).code == "signature"


def test_too_large() -> None:
    err = rejection(signed(), max_bytes=100)
    assert (err.code, err.reason) == ("too_large", f"too large: {len(signed())} bytes, the limit is 100")


def test_expiry_leeway_tolerates_clock_difference() -> None:
    raw = signed(expires_at="2026-03-01T11:59:00Z")
    assert rejection(raw).code == "expired"
    assert check(raw, leeway_s=120).generation == 5


def test_expires_exactly_now_is_expired() -> None:
    assert rejection(signed(expires_at="2026-03-01T12:00:00Z")).code == "expired"


def test_rejection_carries_the_received_generation() -> None:
    assert rejection(signed(generation=9, device_id="dev2")).generation == 9
    assert rejection(b"nope").generation is None


def test_redelivery_of_the_applied_generation_is_recognised() -> None:
    err = rejection(signed(generation=4))
    assert err.is_redelivery(4)
    assert not rejection(signed(generation=3)).is_redelivery(4)
    assert not rejection(signed(device_id="dev2", generation=4)).is_redelivery(4)


ORDER = {
    "device before signature": (orjson.dumps(doc(device_id="dev2")), "device"),
    "signature before generation": (orjson.dumps(doc(generation=2)), "signature"),
    "signature before expiry": (orjson.dumps(doc(expires_at="2026-03-01T11:30:00Z")), "signature"),
    "generation before expiry": (signed(generation=2, expires_at="2026-03-01T11:30:00Z"), "generation"),
    "schema before device": (orjson.dumps(doc(device_id="dev2", generation=-1)), "schema"),
}


@pytest.mark.parametrize(("raw", "code"), ORDER.values(), ids=ORDER.keys())
def test_check_order(raw: bytes, code: str) -> None:
    assert rejection(raw).code == code
