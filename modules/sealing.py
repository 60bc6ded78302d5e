"""Secrets sealed to one device: X25519 + HKDF-SHA256 + ChaCha20-Poly1305 (an ECIES box).

``edgectl device add`` makes each device an X25519 key pair: the private half goes into the
agent's config, the public half stays in the cloud. The cloud seals a registry password to the
device's public key with a fresh ephemeral key; only that device can open it, and the
``context`` (device id, registry, credential name and revision) is authenticated, so a sealed
value cannot be replayed into another device's or another registry's credential.

A sealed value is base64 of ``ephemeral public key (32) || nonce (12) || ciphertext + tag``.
"""

from __future__ import annotations

import base64
import binascii
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

_INFO = b"edgedeploy sealed secret v1"
_KEY_LEN = 32
_NONCE_LEN = 12


class SealingError(ValueError):
    """A key or sealed value that is malformed, or a value sealed to another key or context."""


def new_key_pair() -> tuple[str, str]:
    """A fresh ``(private, public)`` X25519 key pair, each as base64 of its 32 raw bytes."""
    private = X25519PrivateKey.generate()
    raw = private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    return _b64(raw), public_of(private)


def public_of(private: X25519PrivateKey) -> str:
    """The base64 raw public key of ``private``."""
    return _b64(private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw))


def load_private(value: str) -> X25519PrivateKey:
    """An X25519 private key from base64 of its raw bytes; SealingError when malformed."""
    return X25519PrivateKey.from_private_bytes(_raw(value, "private key"))


def load_public(value: str) -> X25519PublicKey:
    """An X25519 public key from base64 of its raw bytes; SealingError when malformed."""
    return X25519PublicKey.from_public_bytes(_raw(value, "public key"))


def seal(public_key: str, secret: bytes, context: bytes) -> str:
    """``secret`` sealed to ``public_key`` (base64 raw), bound to ``context``."""
    recipient = load_public(public_key)
    ephemeral = X25519PrivateKey.generate()
    eph_public = ephemeral.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    key = _derive(ephemeral.exchange(recipient), eph_public, recipient)
    nonce = os.urandom(_NONCE_LEN)
    return _b64(eph_public + nonce + ChaCha20Poly1305(key).encrypt(nonce, secret, context))


def unseal(private_key: X25519PrivateKey, sealed: str, context: bytes) -> bytes:
    """Open ``sealed`` with ``private_key``; SealingError when it was sealed to another key or context."""
    data = _raw(sealed, "sealed value", exact=None)
    if len(data) < _KEY_LEN + _NONCE_LEN + 16:
        raise SealingError(f"sealed value is too short ({len(data)} bytes)")
    eph_public, nonce, box = (
        data[:_KEY_LEN],
        data[_KEY_LEN : _KEY_LEN + _NONCE_LEN],
        data[_KEY_LEN + _NONCE_LEN :],
    )
    key = _derive(
        private_key.exchange(X25519PublicKey.from_public_bytes(eph_public)),
        eph_public,
        private_key.public_key(),
    )
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, box, context)
    except InvalidTag:
        raise SealingError("sealed to another device key or for another credential") from None


def _derive(shared: bytes, eph_public: bytes, recipient: X25519PublicKey) -> bytes:
    salt = eph_public + recipient.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_LEN, salt=salt, info=_INFO).derive(shared)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _raw(value: str, what: str, exact: int | None = _KEY_LEN) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise SealingError(f"{what} is not base64") from None
    if exact is not None and len(raw) != exact:
        raise SealingError(f"{what} must be {exact} bytes, got {len(raw)}")
    return raw
