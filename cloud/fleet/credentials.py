"""Registry credentials of the fleet: set, rotate, list and remove them; seal them to devices.

A deployment names the credentials its devices pull with (``registry_credentials``). A device's
desired state then carries, per credential, the registry, the username, the revision and the
password sealed to that device's X25519 key, nothing else: no other device, no broker user and
no log can read it. Setting a credential again (rotation) moves its revision on, so every device
that uses it gets a new generation with only the credential changed: its modules keep running.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat
from sqlalchemy import select
from sqlalchemy.orm import Session

from cloud.fleet.sql import aware
from cloud.store.credentials import RegistryCredential
from cloud.store.devices import Device
from cloud.store.errors import InUseError, InvalidInputError, NotFoundError
from cloud.store.models import Deployment
from modules.contract import DeploymentManifest, RegistryCredentialRef
from modules.sealing import seal

_AT_REST = "enc1:"
"""Prefix of a password stored encrypted (ChaCha20-Poly1305, key derived from the signing key)."""


def _at_rest_box(key: Ed25519PrivateKey) -> ChaCha20Poly1305:
    """The cipher for passwords at rest: its key derives from the cloud's signing key, which lives
    in the data directory, not in the database, so a database dump or backup holds no password."""
    raw = key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"edgedeploy credentials at rest v1")
    return ChaCha20Poly1305(derived.derive(raw))


def encrypt_password(key: Ed25519PrivateKey, name: str, password: str) -> str:
    """``password`` as stored for credential ``name``."""
    nonce = os.urandom(12)
    box = _at_rest_box(key).encrypt(nonce, password.encode(), name.encode())
    return _AT_REST + base64.b64encode(nonce + box).decode("ascii")


def decrypt_password(key: Ed25519PrivateKey, name: str, stored: str) -> str:
    """The password of credential ``name`` from its stored form; InvalidInputError when the signing
    key is not the one it was stored with."""
    if not stored.startswith(_AT_REST):
        return stored  # written before passwords were encrypted at rest
    data = base64.b64decode(stored[len(_AT_REST) :])
    try:
        return _at_rest_box(key).decrypt(data[:12], data[12:], name.encode()).decode()
    except InvalidTag:
        raise InvalidInputError(
            f"registry credential {name!r} was stored with another signing key: set it again"
        ) from None


@dataclass(frozen=True)
class CredentialView:
    """A stored credential as ``edgectl credential list`` shows it: never the password."""

    name: str
    registry: str
    username: str
    revision: int
    updated_at: datetime
    used_by: list[str]
    """Deployments that list it."""


def set_credential(
    s: Session, key: Ed25519PrivateKey, name: str, registry: str, username: str, password: str, now: datetime
) -> tuple[int, bool]:
    """Create or rotate credential ``name``; returns ``(revision, created)``.

    An unchanged credential keeps its revision (nothing to send again).
    """
    if not registry or "/" in registry or " " in registry:
        raise InvalidInputError(f"--registry {registry!r}: expected HOST[:PORT], e.g. 127.0.0.1:5000")
    if not username:
        raise InvalidInputError("--username must not be empty")
    if not password:
        raise InvalidInputError("the password is empty")
    row = s.get(RegistryCredential, name)
    if row is None:
        s.add(
            RegistryCredential(
                name=name,
                registry_host=registry,
                username=username,
                password=password,
                revision=1,
                created_at=now,
                updated_at=now,
            )
        )
        return 1, True
    try:
        before: str | None = decrypt_password(key, name, row.password)
    except InvalidInputError:
        before = None  # stored under another signing key: setting it again replaces it
    if (row.registry_host, row.username, before) != (registry, username, password):
        row.registry_host, row.username = registry, username
        row.password = encrypt_password(key, name, password)
        row.revision += 1
        row.updated_at = now
    return row.revision, False


def list_credentials(s: Session) -> list[CredentialView]:
    """Every credential, by name, with the deployments that use it."""
    used = users(s)
    return [
        CredentialView(
            r.name, r.registry_host, r.username, r.revision, aware(r.updated_at), used.get(r.name, [])
        )
        for r in s.scalars(select(RegistryCredential).order_by(RegistryCredential.name))
    ]


def remove_credential(s: Session, name: str) -> None:
    """Delete credential ``name``; InUseError while a deployment lists it."""
    row = s.get(RegistryCredential, name)
    if row is None:
        raise NotFoundError(f"registry credential {name!r} does not exist")
    using = users(s).get(name)
    if using:
        raise InUseError(
            f"registry credential {name!r} is used by deployment(s) {', '.join(using)}: "
            "remove it from their registry_credentials first"
        )
    s.delete(row)


def users(s: Session) -> dict[str, list[str]]:
    """credential name → the deployments whose manifest lists it."""
    out: dict[str, list[str]] = {}
    for name, manifest in s.execute(select(Deployment.name, Deployment.manifest).order_by(Deployment.name)):
        if manifest:
            for credential in manifest.get("registry_credentials", []):
                out.setdefault(credential, []).append(name)
    return out


def credential_refs(s: Session) -> dict[str, RegistryCredentialRef]:
    """Every credential as an unsealed reference (what content hashes and revisions compare)."""
    return {
        r.name: RegistryCredentialRef(
            registry=r.registry_host, name=r.name, revision=r.revision, username=r.username
        )
        for r in s.scalars(select(RegistryCredential))
    }


def pull_auth(s: Session, key: Ed25519PrivateKey) -> dict[str, tuple[str, str]]:
    """registry host → ``(username, password)`` for the cloud's own pulls (packaging base images)."""
    return {
        r.registry_host: (r.username, decrypt_password(key, r.name, r.password))
        for r in s.scalars(select(RegistryCredential))
    }


def check_credentials(
    s: Session, manifest: DeploymentManifest, devices: Iterable[str], source: str
) -> list[str]:
    """Problems with ``manifest``'s credentials: unknown names, selected devices without a key."""
    if not manifest.registry_credentials:
        return []
    known = set(credential_refs(s))
    problems = [
        f"{source}: registry_credentials: unknown credential {n!r} (set it with: edgectl credential set {n} "
        "--registry HOST --username USER --password-env VAR)"
        for n in manifest.registry_credentials
        if n not in known
    ]
    wanted = set(devices)
    keyless = sorted(
        d for d, key in s.execute(select(Device.id, Device.sealing_public_key)) if d in wanted and key is None
    )
    if keyless:
        problems.append(
            f"{source}: registry_credentials: device(s) {', '.join(keyless)} have no sealing key "
            "(provisioned before registry credentials existed): provision them again with "
            "edgectl device add --force"
        )
    return problems


class DeviceSealer:
    """Seals credential passwords to devices' keys (``desired.Sealer``)."""

    def __init__(self, passwords: Mapping[str, str], keys: Mapping[str, str | None]) -> None:
        self.passwords = passwords
        self.keys = keys

    @classmethod
    def load(cls, s: Session, key: Ed25519PrivateKey) -> DeviceSealer:
        """Passwords (decrypted with the signing key's derived key) and device keys from the store."""
        passwords = {
            r.name: decrypt_password(key, r.name, r.password) for r in s.scalars(select(RegistryCredential))
        }
        keys = {d: k for d, k in s.execute(select(Device.id, Device.sealing_public_key))}
        return cls(passwords, keys)

    def __call__(self, device_id: str, credential: RegistryCredentialRef) -> RegistryCredentialRef:
        key = self.keys.get(device_id)
        password = self.passwords.get(credential.name or "")
        if key is None or password is None:
            return credential  # the agent says it cannot open it; apply refuses such devices
        sealed = seal(key, password.encode(), credential.sealing_context(device_id))
        return credential.model_copy(update={"sealed": sealed})
