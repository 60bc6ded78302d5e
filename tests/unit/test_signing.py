"""Ed25519 signing of desired states: round trips, tampering, malformed signatures, key loading."""

from __future__ import annotations

import base64
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from modules.contract import DesiredState
from modules.signing import (
    KeyFormatError,
    SignatureError,
    generate_keypair,
    load_private_key,
    load_private_key_file,
    load_public_key,
    load_public_key_file,
    public_key_pem,
    sign_desired,
    verify_desired,
)

PRIVATE_PEM, PUBLIC_PEM = generate_keypair()
PRIVATE = load_private_key(PRIVATE_PEM)
PUBLIC = load_public_key(PUBLIC_PEM)


def state(**changes: Any) -> DesiredState:
    data: dict[str, Any] = {
        "device_id": "dev1",
        "generation": 7,
        "issued_at": datetime(2026, 3, 1, tzinfo=timezone.utc),
        "expires_at": datetime(2026, 3, 2, tzinfo=timezone.utc),
        "modules": {
            "web": {
                "image": "localhost:5000/web:1",
                "env": {"MODEL": "digits"},
                "ports": [{"container": 5001}],
            },
            "api": {"image": "localhost:5000/api:3", "startup_order": 2},
        },
        "registry_credentials": [{"registry": "localhost:5000", "secret": "local"}],
    }
    data.update(changes)
    return DesiredState.model_validate(data)


def test_round_trip_through_json() -> None:
    signed = sign_desired(state(), PRIVATE)
    assert signed.signature is not None
    assert len(base64.b64decode(signed.signature)) == 64
    received = DesiredState.model_validate_json(signed.model_dump_json())
    verify_desired(received, PUBLIC)


def test_signing_returns_a_copy() -> None:
    original = state()
    signed = sign_desired(original, PRIVATE)
    assert original.signature is None
    assert signed.model_dump(exclude={"signature"}) == original.model_dump(exclude={"signature"})


def test_resigning_a_signed_state_gives_a_valid_signature() -> None:
    twice = sign_desired(sign_desired(state(), PRIVATE), PRIVATE)
    verify_desired(twice, PUBLIC)


def test_json_layout_does_not_matter() -> None:
    """The signature covers the canonical form, not the bytes on the wire."""
    signed = sign_desired(state(), PRIVATE)
    pretty = signed.model_dump_json(indent=4)
    verify_desired(DesiredState.model_validate_json(pretty), PUBLIC)


TAMPER = {
    "generation": {"generation": 8},
    "device": {"device_id": "dev2"},
    "expiry": {"expires_at": datetime(2026, 3, 3, tzinfo=timezone.utc)},
    "one env byte": {
        "modules": {
            "web": {
                "image": "localhost:5000/web:1",
                "env": {"MODEL": "digitS"},
                "ports": [{"container": 5001}],
            },
            "api": {"image": "localhost:5000/api:3", "startup_order": 2},
        }
    },
    "image tag": {
        "modules": {
            "web": {
                "image": "localhost:5000/web:2",
                "env": {"MODEL": "digits"},
                "ports": [{"container": 5001}],
            },
            "api": {"image": "localhost:5000/api:3", "startup_order": 2},
        }
    },
    "credentials": {"registry_credentials": [{"registry": "evil.example", "secret": "local"}]},
    "rollback": {"rollback": "none"},
}


@pytest.mark.parametrize("changes", TAMPER.values(), ids=TAMPER.keys())
def test_tampering_is_detected(changes: dict[str, Any]) -> None:
    signature = sign_desired(state(), PRIVATE).signature
    tampered = state(**changes, signature=signature)
    with pytest.raises(SignatureError, match=r"^mismatch: "):
        verify_desired(tampered, PUBLIC)


def test_one_flipped_byte_in_the_wire_json_is_detected() -> None:
    wire = sign_desired(state(), PRIVATE).model_dump_json().encode()
    tampered = wire.replace(b'"generation":7', b'"generation":9')
    assert tampered != wire
    with pytest.raises(SignatureError, match=r"^mismatch: "):
        verify_desired(DesiredState.model_validate_json(tampered), PUBLIC)


def test_flipped_signature_bit_is_detected() -> None:
    raw = bytearray(base64.b64decode(sign_desired(state(), PRIVATE).signature or ""))
    raw[10] ^= 0x01
    with pytest.raises(SignatureError, match=r"^mismatch: "):
        verify_desired(state(signature=base64.b64encode(bytes(raw)).decode()), PUBLIC)


def test_another_key_does_not_verify() -> None:
    _, other_public = generate_keypair()
    with pytest.raises(SignatureError, match="not signed by the configured cloud key"):
        verify_desired(sign_desired(state(), PRIVATE), load_public_key(other_public))


@pytest.mark.parametrize(
    ("signature", "message"),
    [
        (None, "missing: the desired state carries no signature"),
        ("", "missing: the desired state carries no signature"),
        ("@@@@", "malformed: not base64"),
        (base64.b64encode(b"x" * 63).decode(), "malformed: 63 bytes, an Ed25519 signature has 64"),
    ],
)
def test_malformed_signatures(signature: str | None, message: str) -> None:
    with pytest.raises(SignatureError) as info:
        verify_desired(state(signature=signature), PUBLIC)
    assert str(info.value).startswith(message)


def test_key_files(tmp_path: Path) -> None:
    (tmp_path / "cloud.key").write_bytes(PRIVATE_PEM)
    (tmp_path / "cloud.pub").write_bytes(PUBLIC_PEM)
    private = load_private_key_file(tmp_path / "cloud.key")
    public = load_public_key_file(tmp_path / "cloud.pub")
    verify_desired(sign_desired(state(), private), public)
    assert public_key_pem(private) == PUBLIC_PEM == public_key_pem(public)


def test_pem_as_text() -> None:
    verify_desired(
        sign_desired(state(), load_private_key(PRIVATE_PEM.decode())), load_public_key(PUBLIC_PEM.decode())
    )


def test_garbage_key_names_its_source(tmp_path: Path) -> None:
    path = tmp_path / "cloud.pub"
    path.write_text("not a key")
    with pytest.raises(KeyFormatError, match=rf"^{re.escape(str(path))}: not a PEM public key"):
        load_public_key_file(path)
    with pytest.raises(KeyFormatError, match=r"^private key: not an unencrypted PEM private key"):
        load_private_key(b"garbage")


def test_public_key_where_a_private_one_is_expected() -> None:
    with pytest.raises(KeyFormatError, match=r"^private key: not an unencrypted PEM private key"):
        load_private_key(PUBLIC_PEM)


def test_other_key_types_are_refused() -> None:
    ec = generate_private_key(SECP256R1())
    ec_private = ec.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    ec_public = ec.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(KeyFormatError, match="expected an Ed25519 private key, got "):
        load_private_key(ec_private)
    with pytest.raises(KeyFormatError, match="expected an Ed25519 public key, got "):
        load_public_key(ec_public)
