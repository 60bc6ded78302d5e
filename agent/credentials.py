"""Registry credentials on the device: open the cloud's sealed ones, look up the agent's own. Pure.

A desired state names, per registry, either a cloud credential (username plus the password sealed
to this device's key, ``modules/sealing.py``) or a ``secret`` from the agent's config
(``registry_secrets``). Errors say which credential and why, never its password.
"""

from __future__ import annotations

from collections.abc import Mapping

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from modules.contract import RegistryCredentialRef
from modules.sealing import SealingError, unseal

Credentials = Mapping[str, tuple[str, str]]
"""Registry secrets by name (``RegistryCredentialRef.secret``): ``(username, password)``."""


class CredentialError(ValueError):
    """A credential this agent cannot use; the message names it and the registry."""


def resolve_credential(
    ref: RegistryCredentialRef, device_id: str, secrets: Credentials, key: X25519PrivateKey | None
) -> tuple[str, str]:
    """``(username, password)`` for ``ref``."""
    if ref.secret is not None:
        found = secrets.get(ref.secret)
        if found is None:
            raise CredentialError(
                f"registry credential {ref.secret!r} (for {ref.registry}) is not in the agent's secret store"
            )
        return found
    what = f"registry credential {ref.name!r} revision {ref.revision} (for {ref.registry})"
    if ref.sealed is None:
        raise CredentialError(f"{what} was not sealed to this device (the cloud has no key for it)")
    if key is None:
        raise CredentialError(f"{what} is sealed, but the agent config has no sealing_key to open it")
    try:
        password = unseal(key, ref.sealed, ref.sealing_context(device_id))
    except SealingError as e:
        raise CredentialError(f"{what} cannot be opened with this device's key: {e}") from None
    assert ref.username is not None
    return ref.username, password.decode()


def pull_auth(
    ref: RegistryCredentialRef | None, device_id: str, secrets: Credentials, key: X25519PrivateKey | None
) -> tuple[str, str] | None:
    """``(username, password)`` for a pull, or None when the desired state names no credential."""
    return None if ref is None else resolve_credential(ref, device_id, secrets, key)
