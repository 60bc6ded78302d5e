"""Where the registry client agrees to send credentials for a bearer token."""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from cloud.packaging.errors import RegistryError
from cloud.packaging.registry_client import (
    Credentials,
    Readable,
    RegistryClient,
    _Response,
    check_token_realm,
)

ALLOWED = [
    # (realm, registry, registry over https)
    ("https://auth.example.com/token", "registry.example.com", True),  # a delegated auth service
    ("https://registry.example.com/token", "registry.example.com", True),
    ("http://127.0.0.1:5001/token", "registry.example.com", True),  # loopback never leaves the host
    ("http://localhost/token", "127.0.0.1:5000", False),
    ("http://[::1]:5001/token", "[::1]:5000", False),
    ("http://registry.lan:5001/token", "registry.lan:5000", False),  # the insecure registry's own host
]

REFUSED = [
    ("http://auth.example.com/token", "registry.example.com", True, "over plain HTTP on another host"),
    ("http://registry.example.com/token", "registry.example.com", True, "over plain HTTP on another host"),
    ("http://evil.example/token", "registry.lan:5000", False, "over plain HTTP on another host"),
    ("ftp://registry.lan/token", "registry.lan:5000", False, "not an http(s) URL"),
    ("/token", "registry.lan:5000", False, "not an http(s) URL"),
]


@pytest.mark.parametrize(("realm", "registry", "secure"), ALLOWED)
def test_realms_credentials_may_go_to(realm: str, registry: str, secure: bool) -> None:
    check_token_realm(realm, registry, secure=secure)


@pytest.mark.parametrize(("realm", "registry", "secure", "why"), REFUSED)
def test_realms_credentials_must_not_go_to(realm: str, registry: str, secure: bool, why: str) -> None:
    with pytest.raises(RegistryError, match=f"registry {registry} names the token endpoint") as err:
        check_token_realm(realm, registry, secure=secure)
    assert why in str(err.value)


class RecordingClient(RegistryClient):
    """Answers every request with 401 and a bearer challenge naming ``realm``; records what was sent."""

    def __init__(self, realm: str) -> None:
        super().__init__("registry.example.com", Credentials("ci", "s3cret-pw"))
        self.realm = realm
        self.sent: list[tuple[str, dict[str, str]]] = []

    def _send(
        self, method: str, url: str, headers: Mapping[str, str], body: bytes | Readable | None, what: str
    ) -> _Response:
        self.sent.append((url, dict(headers)))
        challenge = f'Bearer realm="{self.realm}",service="registry"'
        return _Response(401, {"www-authenticate": challenge}, b"")


def test_a_plain_http_realm_elsewhere_gets_no_request_and_the_password_is_not_shown() -> None:
    client = RecordingClient("http://auth.example.com/token")
    with pytest.raises(RegistryError) as err:
        client.ping()
    assert [url for url, _ in client.sent] == ["https://registry.example.com/v2/"]  # not the realm
    assert "s3cret-pw" not in str(err.value) and "s3cret-pw" not in repr(client.credentials)
