"""Where a broker is and how to talk to it: URLs (several, for fail-over), TLS and credentials.

One parser for every broker URL of the project: ``mqtt://host[:port]`` (plain, 1883 by default)
or ``mqtts://host[:port]`` (TLS, 8883), optionally with ``user[:password]@`` where the caller
allows it. ``Endpoint.parse`` takes one URL, several separated by commas, or a list: the nodes of
a cluster, tried in turn; a session that loses one node connects to the next.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import unquote, urlsplit

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class BrokerUnavailable(Exception):
    """The broker cannot be reached or refused the connection; the message says which and where."""


@dataclass(frozen=True)
class Address:
    """One broker node: host, port and whether it speaks TLS."""

    host: str
    port: int
    tls: bool = False

    @property
    def url(self) -> str:
        """``mqtt[s]://host:port`` (no credentials), for messages."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"


@dataclass(frozen=True)
class ParsedUrl:
    """One broker URL, split: the address and the credentials it carried (if any)."""

    address: Address
    username: str | None = None
    password: str | None = None


def parse_url(url: str, *, credentials: bool = True) -> ParsedUrl:
    """Split one broker URL; ValueError naming the URL and what is wrong with it.

    With ``credentials=False`` a ``user@`` part is an error (configuration files keep secrets
    apart from URLs).
    """
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"broker URL {url!r} is not a valid URL ({e})") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise ValueError(f"broker URL {url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
    if not parts.hostname:
        raise ValueError(f"broker URL {url!r} names no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"broker URL {url!r}: a broker URL has no path, query or fragment")
    if port == 0:
        raise ValueError(f"broker URL {url!r}: port 0 is not a broker port")
    if not credentials and (parts.username is not None or parts.password is not None):
        raise ValueError(
            f"broker URL {parts.scheme}://{parts.hostname}: put credentials in username/password "
            "or password_file, not in the URL"
        )
    tls = parts.scheme == "mqtts"
    return ParsedUrl(
        Address(parts.hostname, port or DEFAULT_PORTS[parts.scheme], tls),
        unquote(parts.username) if parts.username else None,
        unquote(parts.password) if parts.password else None,
    )


def split_urls(urls: str | Sequence[str]) -> list[str]:
    """The URLs in ``urls``: a comma-separated string or a list; ValueError when there are none."""
    items = urls.split(",") if isinstance(urls, str) else list(urls)
    out = [u.strip() for u in items if u.strip()]
    if not out:
        raise ValueError("no broker URL given")
    return out


@dataclass(frozen=True)
class Endpoint:
    """The broker nodes of one cluster (or one broker), with the credentials and TLS files to use."""

    addresses: tuple[Address, ...]
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None

    def __post_init__(self) -> None:
        if not self.addresses:
            raise ValueError("an endpoint needs at least one broker address")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together: give both or neither")

    @classmethod
    def parse(
        cls,
        urls: str | Sequence[str],
        *,
        ca_file: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
        username: str | None = None,
        password: str | None = None,
        credentials_in_url: bool = True,
    ) -> Endpoint:
        """An endpoint from one or several URLs; ValueError naming the URL that is wrong.

        Credentials come from ``username``/``password`` or, when those are not given, from the
        URLs (which must then agree).
        """
        parsed = [parse_url(u, credentials=credentials_in_url) for u in split_urls(urls)]
        found = {(p.username, p.password) for p in parsed}
        if username is None:
            if len(found) > 1:
                raise ValueError("the broker URLs carry different credentials: give them once")
            username, password = next(iter(found))
        return cls(
            tuple(p.address for p in parsed),
            username=username,
            password=password,
            ca_file=ca_file,
            client_cert=client_cert,
            client_key=client_key,
        )

    def with_credentials(self, username: str | None, password: str | None) -> Endpoint:
        """This endpoint with other credentials."""
        return replace(self, username=username, password=password)

    @property
    def host(self) -> str:
        """The first node's host."""
        return self.addresses[0].host

    @property
    def port(self) -> int:
        """The first node's port."""
        return self.addresses[0].port

    @property
    def tls(self) -> bool:
        """Whether the first node speaks TLS."""
        return self.addresses[0].tls

    @property
    def url(self) -> str:
        """Every node's URL, comma-separated, without credentials (for messages)."""
        return ",".join(a.url for a in self.addresses)

    def tls_context(self) -> ssl.SSLContext:
        """The TLS context for ``mqtts://``: the CA file (else the system's), and the client certificate.

        ValueError naming the files when they cannot be loaded.
        """
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)
            if self.client_cert is not None and self.client_key is not None:
                context.load_cert_chain(str(self.client_cert), str(self.client_key))
        except (OSError, ssl.SSLError) as e:
            files = ", ".join(str(p) for p in (self.ca_file, self.client_cert, self.client_key) if p)
            raise ValueError(f"cannot load the broker's TLS files ({files or 'system CAs'}): {e}") from e
        return context
