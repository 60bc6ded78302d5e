"""Sealed secrets and credential references: only the right key and context open them; signing is stable."""

from __future__ import annotations

import base64

import pytest

from agent.credentials import CredentialError, resolve_credential
from cloud.fleet.credentials import DeviceSealer
from cloud.fleet.desired import DesiredContent, content_from_payload
from modules.contract import RegistryCredentialRef
from modules.sealing import SealingError, load_private, new_key_pair, seal, unseal
from tests.unit.test_contract import problems

REF = RegistryCredentialRef(registry="reg.local:5000", name="site", revision=3, username="puller")


def test_seal_opens_only_with_its_key_and_context() -> None:
    private, public = new_key_pair()
    sealed = seal(public, b"s3cret", b"ctx")
    assert unseal(load_private(private), sealed, b"ctx") == b"s3cret"
    assert seal(public, b"s3cret", b"ctx") != sealed, "a fresh ephemeral key and nonce every time"
    with pytest.raises(SealingError, match="another device key or for another credential"):
        unseal(load_private(private), sealed, b"other")
    with pytest.raises(SealingError, match="another device key"):
        unseal(load_private(new_key_pair()[0]), sealed, b"ctx")
    raw = bytearray(base64.b64decode(sealed))
    raw[-1] ^= 1
    with pytest.raises(SealingError):
        unseal(load_private(private), base64.b64encode(bytes(raw)).decode(), b"ctx")


@pytest.mark.parametrize(("value", "message"), [("not base64!", "not base64"), ("AAAA", "must be 32 bytes")])
def test_bad_keys_say_what_is_wrong(value: str, message: str) -> None:
    with pytest.raises(SealingError, match=message):
        load_private(value)


def test_the_device_sealer_binds_the_password_to_the_device_and_the_revision() -> None:
    private, public = new_key_pair()
    sealer = DeviceSealer({"site": "pw"}, {"cam-1": public, "old-1": None})
    sealed = sealer("cam-1", REF)
    key = load_private(private)
    assert resolve_credential(sealed, "cam-1", {}, key) == ("puller", "pw")
    with pytest.raises(CredentialError, match="cannot be opened"):
        resolve_credential(sealed, "cam-2", {}, key)
    with pytest.raises(CredentialError, match="cannot be opened"):
        resolve_credential(sealed.model_copy(update={"revision": 4}), "cam-1", {}, key)
    with pytest.raises(CredentialError, match="was not sealed to this device"):
        resolve_credential(sealer("old-1", REF), "old-1", {}, key)
    with pytest.raises(CredentialError, match="no sealing_key"):
        resolve_credential(sealed, "cam-1", {}, None)


def test_agent_secrets_still_resolve_by_name() -> None:
    ref = RegistryCredentialRef(registry="reg.local:5000", secret="local")
    assert resolve_credential(ref, "cam-1", {"local": ("u", "p")}, None) == ("u", "p")
    with pytest.raises(CredentialError, match="not in the agent's secret store"):
        resolve_credential(ref, "cam-1", {}, None)


@pytest.mark.parametrize(
    ("data", "field", "message"),
    [
        ({"registry": "r"}, "", "exactly one of 'secret'"),
        ({"registry": "r", "secret": "a", "name": "b", "username": "u", "revision": 1}, "", "exactly one"),
        ({"registry": "r", "name": "b"}, "", "needs 'username' and 'revision'"),
    ],
)
def test_bad_credential_refs(data: dict[str, object], field: str, message: str) -> None:
    lines = problems(RegistryCredentialRef, data)
    assert any(message in line for line in lines), lines


def test_content_hash_ignores_the_sealed_bytes() -> None:
    """Re-sealing (a new ephemeral key each time) must not give devices a new generation."""
    _, public = new_key_pair()
    sealer = DeviceSealer({"site": "pw"}, {"cam-1": public})
    a = DesiredContent("d", {}, registry_credentials=(sealer("cam-1", REF),))
    b = DesiredContent("d", {}, registry_credentials=(sealer("cam-1", REF),))
    assert a.registry_credentials != b.registry_credentials
    assert a.hash == b.hash == DesiredContent("d", {}, registry_credentials=(REF,)).hash
    rotated = DesiredContent("d", {}, registry_credentials=(REF.model_copy(update={"revision": 4}),))
    assert rotated.hash != a.hash


def test_content_read_back_from_a_signed_payload_drops_the_sealed_bytes() -> None:
    from datetime import datetime, timezone

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from cloud.fleet.desired import Renderer

    _, public = new_key_pair()
    renderer = Renderer(
        Ed25519PrivateKey.generate(),
        datetime(2026, 1, 1, tzinfo=timezone.utc),
        sealer=DeviceSealer({"site": "Distinctive-Password-42"}, {"cam-1": public}),
    )
    content = DesiredContent("d", {}, registry_credentials=(REF,))
    payload = renderer.payload("cam-1", 1, content, content.hash)
    assert b'"sealed":"' in payload and b"Distinctive-Password-42" not in payload
    assert content_from_payload(payload).hash == content.hash
