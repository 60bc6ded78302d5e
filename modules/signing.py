"""Ed25519 signatures over desired states, shared by the cloud (signs) and the agent (verifies).

The signature covers ``DesiredState.canonical_bytes()`` (canonical JSON of every field but the
signature) and travels base64-encoded in ``DesiredState.signature``. Load keys once with
``load_private_key``/``load_public_key`` and reuse the key objects: signing and verifying are then
a few tens of microseconds each.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from modules.contract import DesiredState

SIGNATURE_BYTES = 64


class SignatureError(Exception):
    """A desired state's signature is missing, malformed or does not match; ``str()`` says which."""


class KeyFormatError(ValueError):
    """A key file or PEM blob is not an Ed25519 key of the expected kind."""


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh Ed25519 key pair as ``(private_pem, public_pem)`` (PKCS#8 and SubjectPublicKeyInfo)."""
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_pem, public_pem


def load_private_key(pem: bytes | str, *, source: str = "private key") -> Ed25519PrivateKey:
    """Parse an unencrypted PEM Ed25519 private key; raises ``KeyFormatError`` naming ``source``."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyFormatError(f"{source}: not an unencrypted PEM private key ({e})") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFormatError(f"{source}: expected an Ed25519 private key, got {type(key).__name__}")
    return key


def load_public_key(pem: bytes | str, *, source: str = "public key") -> Ed25519PublicKey:
    """Parse a PEM Ed25519 public key; raises ``KeyFormatError`` naming ``source``."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise KeyFormatError(f"{source}: not a PEM public key ({e})") from e
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFormatError(f"{source}: expected an Ed25519 public key, got {type(key).__name__}")
    return key


def load_private_key_file(path: str | Path) -> Ed25519PrivateKey:
    """Read and parse a PEM Ed25519 private key file."""
    return load_private_key(Path(path).read_bytes(), source=str(path))


def load_public_key_file(path: str | Path) -> Ed25519PublicKey:
    """Read and parse a PEM Ed25519 public key file."""
    return load_public_key(Path(path).read_bytes(), source=str(path))


def public_key_pem(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The PEM public key of a key pair (or of a public key), for the agent's configuration."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign_desired(state: DesiredState, private_key: Ed25519PrivateKey) -> DesiredState:
    """A copy of ``state`` whose ``signature`` is the base64 Ed25519 signature of its canonical bytes."""
    signature = private_key.sign(state.canonical_bytes())
    return state.model_copy(update={"signature": base64.b64encode(signature).decode("ascii")})


def verify_desired(state: DesiredState, public_key: Ed25519PublicKey) -> None:
    """Check ``state.signature`` against ``public_key``; raises ``SignatureError`` saying what is wrong."""
    if not state.signature:
        raise SignatureError("missing: the desired state carries no signature")
    try:
        signature = base64.b64decode(state.signature, validate=True)
    except (binascii.Error, ValueError) as e:
        raise SignatureError(f"malformed: not base64 ({e})") from e
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"malformed: {len(signature)} bytes, an Ed25519 signature has {SIGNATURE_BYTES}")
    try:
        public_key.verify(signature, state.canonical_bytes())
    except InvalidSignature:
        raise SignatureError(
            "mismatch: not signed by the configured cloud key, or changed after signing"
        ) from None
