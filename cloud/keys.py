"""The cloud's Ed25519 signing key: created on first use under the data directory, loaded afterwards.

``<data dir>/keys/cloud-signing.key`` (PKCS#8 PEM, mode 0600, in a 0700 folder) signs every
desired state; ``cloud-signing.pub`` next to it is what each agent's configuration points at.
Creation is exclusive (``O_EXCL``), so two processes starting at once end up with the same key.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modules.signing import KeyFormatError, generate_keypair, load_private_key, public_key_pem

KEYS_DIR = "keys"
PRIVATE_KEY_FILE = "cloud-signing.key"
PUBLIC_KEY_FILE = "cloud-signing.pub"


class KeyFileError(Exception):
    """The signing key cannot be read, written or parsed; the message names the file."""


def private_key_path(data_dir: Path) -> Path:
    """Where the cloud's private signing key lives."""
    return data_dir / KEYS_DIR / PRIVATE_KEY_FILE


def public_key_path(data_dir: Path) -> Path:
    """Where the cloud's public key (for agents) lives."""
    return data_dir / KEYS_DIR / PUBLIC_KEY_FILE


def _create_private_key(path: Path) -> None:
    """Write a fresh key to ``path`` unless another process got there first."""
    private_pem, _ = generate_keypair()
    tmp = _temp_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(private_pem)
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_name(path: Path) -> Path:
    """A temporary name beside ``path``, unique across processes and threads."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")


def _check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KeyFileError(
            f"{path}: private signing key is readable by others (mode {mode:04o}); run: chmod 600 {path}"
        )


def load_or_create_signing_key(data_dir: Path) -> Ed25519PrivateKey:
    """The cloud's private key, generated on first use; also (re)writes the public key file.

    Raises ``KeyFileError`` when the key file is unreadable, not an Ed25519 key, or readable by
    group or others.
    """
    path = private_key_path(data_dir)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not path.exists():
            _create_private_key(path)
        _check_private(path)
        key = load_private_key(path.read_bytes(), source=str(path))
        public = public_key_path(data_dir)
        pem = public_key_pem(key)
        if not public.is_file() or public.read_bytes() != pem:
            tmp = _temp_name(public)
            tmp.write_bytes(pem)
            os.chmod(tmp, 0o644)
            os.replace(tmp, public)
    except KeyFormatError as e:
        raise KeyFileError(str(e)) from None
    except OSError as e:
        raise KeyFileError(f"cloud signing key in {path.parent}: {e.strerror or e}") from None
    return key


def public_key_bytes(data_dir: Path) -> bytes:
    """The PEM public key agents verify desired states with (creating the key pair if needed)."""
    return public_key_pem(load_or_create_signing_key(data_dir))
