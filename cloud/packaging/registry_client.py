"""A small client for the OCI distribution API (CNCF registry, Harbor, ACR, ECR, ...).

Only what pushing a prepared image needs: check, mount and upload blobs, put and get manifests.
Loopback registries are spoken to over plain HTTP (as Docker does), others over HTTPS. Basic and
bearer-token authentication are handled; credentials go to a token endpoint only over HTTPS, or
over plain HTTP to a loopback host or to an insecure registry's own host. Every failure becomes
one ``RegistryError`` line naming the registry and what it refused.
"""

from __future__ import annotations

import base64
import http.client
import json
import re
import ssl
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from cloud.packaging.errors import RegistryError
from modules.hosts import is_loopback

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MANIFEST_ACCEPT = ", ".join(
    [
        MANIFEST_V2,
        OCI_MANIFEST,
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)
_CHUNK = 1 << 20
_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


def check_token_realm(realm: str, registry: str, *, secure: bool) -> None:
    """Refuse a token endpoint (``realm``) that credentials must not be sent to.

    An ``https`` realm is fine on any host (registries often delegate to an auth service). A plain
    ``http`` one only on a loopback host, or on the registry's own host when the registry itself
    is spoken to over plain HTTP (an insecure local registry): anywhere else the password would
    cross the network readable.
    """
    parts = urllib.parse.urlsplit(realm)
    try:
        host = parts.hostname
    except ValueError:
        host = None
    where = f"registry {registry} names the token endpoint {parts.scheme}://{host or '?'}"
    if parts.scheme not in ("http", "https") or not host:
        raise RegistryError(f"{where}, which is not an http(s) URL; no credentials were sent")
    if parts.scheme == "https":
        return
    registry_host = urllib.parse.urlsplit("//" + registry).hostname
    if is_loopback(host) or (not secure and host == registry_host):
        return
    raise RegistryError(
        f"{where} over plain HTTP on another host; refusing to send credentials there "
        "(the registry's auth service must use https)"
    )


class Readable(Protocol):
    """What http.client can stream a request body from."""

    def read(self, n: int = ..., /) -> bytes:
        """Up to ``n`` bytes; empty at the end."""
        ...


@dataclass(frozen=True)
class Credentials:
    """A user name and password (or token) for a registry; never printed."""

    username: str
    password: str = field(repr=False)


@dataclass
class _Response:
    status: int
    headers: Mapping[str, str]
    body: bytes


class RegistryClient:
    """Talk to one registry at ``address`` (``host[:port]``)."""

    def __init__(
        self,
        address: str,
        credentials: Credentials | None = None,
        *,
        insecure: bool | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        address = address.strip().rstrip("/")
        if "://" in address:
            raise RegistryError(f"registry address {address!r} must be host[:port], without a scheme")
        self.address = address
        host = urllib.parse.urlsplit("//" + address).hostname or address
        self.secure = not (is_loopback(host) if insecure is None else insecure)
        self.credentials = credentials
        self.timeout_s = timeout_s
        self._tokens: dict[str, str] = {}

    # ------------------------------------------------------------------------------------ transport

    def _connection(self, netloc: str, secure: bool) -> http.client.HTTPConnection:
        if secure:
            return http.client.HTTPSConnection(
                netloc, timeout=self.timeout_s, context=ssl.create_default_context()
            )
        return http.client.HTTPConnection(netloc, timeout=self.timeout_s)

    def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | Readable | None,
        what: str,
    ) -> _Response:
        parts = urllib.parse.urlsplit(url)
        conn = self._connection(parts.netloc, parts.scheme == "https")
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request(method, target, body=body, headers=dict(headers))
            resp = conn.getresponse()
            data = resp.read()
            return _Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        except ConnectionRefusedError:
            raise RegistryError(
                f"registry {self.address} is not reachable (connection refused) while {what}: "
                "is it running? (start it or pass another --registry)"
            ) from None
        except TimeoutError:
            raise RegistryError(
                f"registry {self.address} did not answer within {self.timeout_s:.0f} s while {what}"
            ) from None
        except ssl.SSLError as exc:
            raise RegistryError(
                f"registry {self.address}: TLS failed while {what}: {exc.reason or exc}"
            ) from None
        except OSError as exc:
            raise RegistryError(
                f"registry {self.address} is not reachable while {what}: {exc.strerror or exc}"
            ) from None
        except http.client.HTTPException as exc:
            raise RegistryError(
                f"registry {self.address} broke the connection while {what}: {exc!r}"
            ) from None
        finally:
            conn.close()

    def _url(self, path: str) -> str:
        return f"{'https' if self.secure else 'http'}://{self.address}{path}"

    def _authorization(self, challenge: str, scope: str) -> str | None:
        """Answer a ``WWW-Authenticate`` challenge: basic credentials or a bearer token."""
        scheme = challenge.split(" ", 1)[0].lower()
        if scheme == "basic":
            if self.credentials is None:
                return None
            raw = f"{self.credentials.username}:{self.credentials.password}".encode()
            return "Basic " + base64.b64encode(raw).decode()
        if scheme != "bearer":
            return None
        params = dict(_CHALLENGE_RE.findall(challenge))
        realm = params.get("realm")
        if not realm:
            return None
        check_token_realm(realm, self.address, secure=self.secure)
        query = {"service": params.get("service", ""), "scope": params.get("scope", scope)}
        url = (
            realm
            + ("&" if "?" in realm else "?")
            + urllib.parse.urlencode({k: v for k, v in query.items() if v})
        )
        headers = {}
        if self.credentials is not None:
            raw = f"{self.credentials.username}:{self.credentials.password}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode()
        resp = self._send("GET", url, headers, None, "getting an access token")
        if resp.status != 200:
            raise RegistryError(
                f"registry {self.address} refused the credentials: token endpoint answered {resp.status}"
            )
        token = json.loads(resp.body or b"{}")
        value = token.get("token") or token.get("access_token")
        return f"Bearer {value}" if value else None

    def request(
        self,
        method: str,
        path_or_url: str,
        *,
        scope: str,
        what: str,
        headers: Mapping[str, str] | None = None,
        body: Callable[[], bytes | Readable | None] | None = None,
        ok: tuple[int, ...] = (200,),
    ) -> _Response:
        """Send a request (retrying once with credentials on 401); raise unless the status is in ``ok``."""
        url = path_or_url if "://" in path_or_url else self._url(path_or_url)
        hdrs = dict(headers or {})
        if scope in self._tokens:
            hdrs["Authorization"] = self._tokens[scope]
        resp = self._send(method, url, hdrs, body() if body else None, what)
        if resp.status == 401:
            auth = self._authorization(resp.headers.get("www-authenticate", ""), scope)
            if auth is None:
                hint = "" if self.credentials else " (no credentials given: set them in the inference config)"
                raise RegistryError(f"registry {self.address} needs authentication while {what}{hint}")
            self._tokens[scope] = auth
            hdrs["Authorization"] = auth
            resp = self._send(method, url, hdrs, body() if body else None, what)
        if resp.status not in ok:
            raise RegistryError(f"registry {self.address} refused {what}: {_describe(resp)}")
        return resp

    # ------------------------------------------------------------------------------------ API calls

    def ping(self) -> None:
        """Check that the registry answers the distribution API."""
        self.request("GET", "/v2/", scope="", what="checking the API", ok=(200,))

    def blob_exists(self, repo: str, digest: str) -> bool:
        """True when ``repo`` already has blob ``digest``."""
        resp = self.request(
            "HEAD",
            f"/v2/{repo}/blobs/{digest}",
            scope=_pull(repo),
            what=f"checking blob {digest[:19]}",
            ok=(200, 404),
        )
        return resp.status == 200

    def mount_blob(self, repo: str, digest: str, from_repo: str) -> bool:
        """Ask the registry to link ``digest`` from ``from_repo`` into ``repo``; True when it did."""
        query = urllib.parse.urlencode({"mount": digest, "from": from_repo})
        resp = self.request(
            "POST",
            f"/v2/{repo}/blobs/uploads/?{query}",
            scope=f"{_push(repo)} {_pull(from_repo)}",
            what=f"mounting blob {digest[:19]} from {from_repo}",
            headers={"Content-Length": "0"},
            ok=(201, 202),
        )
        if resp.status == 202 and resp.headers.get("location"):
            self.request(
                "DELETE",
                urllib.parse.urljoin(self._url(f"/v2/{repo}/"), resp.headers["location"]),
                scope=_push(repo),
                what="cancelling an upload",
                ok=(204, 404, 405),
            )
        return resp.status == 201

    def upload_blob(
        self, repo: str, path: Path, digest: str, progress: Callable[[int, int], None] | None = None
    ) -> int:
        """Upload the file at ``path`` as blob ``digest`` in one request; returns the bytes sent."""
        size = path.stat().st_size
        start = self.request(
            "POST",
            f"/v2/{repo}/blobs/uploads/",
            scope=_push(repo),
            what=f"starting the upload of {digest[:19]}",
            headers={"Content-Length": "0"},
            ok=(202,),
        )
        location = start.headers.get("location")
        if not location:
            raise RegistryError(f"registry {self.address} gave no upload location for {digest[:19]}")
        url = urllib.parse.urljoin(self._url(f"/v2/{repo}/"), location)
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"digest": digest})

        def body() -> Readable:
            return _CountingReader(open(path, "rb"), size, progress)

        self.request(
            "PUT",
            url,
            scope=_push(repo),
            what=f"uploading blob {digest[:19]} ({size} bytes)",
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
            body=body,
            ok=(201,),
        )
        return size

    def put_manifest(self, repo: str, reference: str, manifest: bytes, media_type: str = MANIFEST_V2) -> str:
        """Store a manifest under a tag (or digest); returns the digest the registry computed."""
        resp = self.request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            scope=_push(repo),
            what=f"storing the manifest {repo}:{reference}",
            headers={"Content-Type": media_type, "Content-Length": str(len(manifest))},
            body=lambda: manifest,
            ok=(201, 200),
        )
        return resp.headers.get("docker-content-digest", "")

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str] | None:
        """The manifest bytes and media type for a tag or digest, or None when it does not exist."""
        resp = self.request(
            "GET",
            f"/v2/{repo}/manifests/{reference}",
            scope=_pull(repo),
            what=f"reading the manifest {repo}:{reference}",
            headers={"Accept": MANIFEST_ACCEPT},
            ok=(200, 404),
        )
        if resp.status == 404:
            return None
        return resp.body, resp.headers.get("content-type", MANIFEST_V2)

    def get_blob(self, repo: str, digest: str) -> bytes:
        """A (small) blob's bytes, e.g. an image config."""
        return self.request(
            "GET", f"/v2/{repo}/blobs/{digest}", scope=_pull(repo), what=f"reading blob {digest[:19]}"
        ).body

    def delete_manifest(self, repo: str, digest: str) -> None:
        """Delete a manifest by digest where the registry allows it (ignored where it does not)."""
        self.request(
            "DELETE",
            f"/v2/{repo}/manifests/{digest}",
            scope=_push(repo),
            what=f"deleting {repo}@{digest[:19]}",
            ok=(202, 404, 405),
        )


class _CountingReader:
    """A file wrapper that reports how much http.client has read from it, and closes at the end."""

    def __init__(self, fh: BinaryIO, total: int, progress: Callable[[int, int], None] | None) -> None:
        self.fh = fh
        self.total = total
        self.done = 0
        self.progress = progress

    def read(self, n: int = _CHUNK) -> bytes:
        data = self.fh.read(max(n, _CHUNK))
        if not data:
            self.fh.close()
            return data
        self.done += len(data)
        if self.progress is not None:
            self.progress(self.done, self.total)
        return data


def _pull(repo: str) -> str:
    return f"repository:{repo}:pull"


def _push(repo: str) -> str:
    return f"repository:{repo}:pull,push"


def _describe(resp: _Response) -> str:
    """The status and the registry's own error text, e.g. ``405 UNSUPPORTED: read-only mode``."""
    try:
        errors = json.loads(resp.body or b"{}").get("errors") or []
    except (ValueError, AttributeError):
        errors = []
    text = "; ".join(
        f"{e.get('code', '')}: {e.get('message', '')}".strip(": ") for e in errors if isinstance(e, dict)
    )
    if not text:
        text = resp.body[:200].decode("utf-8", "replace").strip().replace("\n", " ")
    return f"HTTP {resp.status}" + (f" {text}" if text else "")
