"""HTTP to an OCI registry for the agent's puller: auth challenges (basic, bearer token), manifests.

``RepoClient`` is one repository on one registry: ``get`` answers a ``401`` challenge once (HTTP
basic, or a token fetched from the challenge's realm with the credentials as basic auth) and
keeps the ``Authorization`` it earned in a table shared between pulls, keyed by the credentials
(a rotated credential never reuses what the old one earned). Errors are ``PullError`` lines
naming the registry and what it answered (its error codes and messages).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import aiohttp

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])
MAX_MANIFEST = 4 * 1024 * 1024
_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')

Tokens = dict[tuple[str, str, tuple[str, str] | None], str]
"""``Authorization`` values by (registry API, repository, credentials)."""


class PullError(Exception):
    """A pull that cannot complete; the message says what the registry or the link did."""


def basic(auth: tuple[str, str]) -> str:
    """An HTTP basic ``Authorization`` value."""
    return "Basic " + base64.b64encode(":".join(auth).encode()).decode()


def why(exc: BaseException) -> str:
    """A failure in words (a read timeout is a stalled link)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "no data (stalled)"
    return str(exc) or type(exc).__name__


async def registry_error(resp: aiohttp.ClientResponse) -> str:
    """``HTTP <status>: <the registry's error codes and messages>``."""
    try:
        body = await resp.read()
        errors = json.loads(body).get("errors") or []
        text = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors) or body[:200].decode()
    except Exception:
        text = resp.reason or ""
    return f"HTTP {resp.status} {text}".strip()


class RepoClient:
    """One repository on one registry, with the auth the registry asks for (basic or bearer token)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base: str,
        repository: str,
        auth: tuple[str, str] | None,
        tokens: Tokens,
        count: Callable[[int], None],
    ) -> None:
        """``tokens``: ``Authorization`` values earned so far, shared between pulls; ``count``:
        told the size of every manifest body received."""
        self.session = session
        self.tokens = tokens
        self.count = count
        self.base = base
        self.repository = repository
        self.auth = auth
        self._authorization = tokens.get((base, repository, auth))

    async def manifest(self, reference: str) -> tuple[str, bytes]:
        """``(content type, body)`` of the manifest ``reference`` (tag or digest)."""
        import aiohttp

        try:
            async with self.get(f"manifests/{reference}", {"Accept": ACCEPT}) as resp:
                if resp.status != 200:
                    raise PullError(f"manifest {self.repository}:{reference}: {await registry_error(resp)}")
                body = await resp.content.read(MAX_MANIFEST + 1)
                if len(body) > MAX_MANIFEST:
                    raise PullError(
                        f"manifest {self.repository}:{reference} is larger than {MAX_MANIFEST} bytes"
                    )
                self.count(len(body))
                return resp.headers.get("Content-Type", "").split(";")[0].strip(), body
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise PullError(f"cannot reach {self.base}: {why(e)}") from None

    def get(self, path: str, headers: Mapping[str, str]) -> AuthedGet:
        """A GET of ``<base>/<repository>/<path>`` that answers the registry's auth challenge once."""
        return AuthedGet(self, f"{self.base}/{self.repository}/{path}", dict(headers))

    async def authorize(self, challenge: str) -> None:
        """Set the ``Authorization`` header the challenge asks for (basic, or a fetched token)."""
        scheme, _, params = challenge.partition(" ")
        if scheme.lower() == "basic":
            if self.auth is None:
                raise PullError(f"{self.base} needs credentials and the desired state gives none")
            self._authorization = basic(self.auth)
        elif scheme.lower() == "bearer":
            self._authorization = "Bearer " + await self._token(dict(_CHALLENGE_RE.findall(params)))
        else:
            raise PullError(f"{self.base} asks for unsupported auth {scheme!r}")
        self.tokens[(self.base, self.repository, self.auth)] = self._authorization

    async def _token(self, params: dict[str, str]) -> str:
        realm = params.get("realm")
        if not realm:
            raise PullError(f"{self.base} sent a bearer challenge without a realm")
        query = {"scope": params.get("scope") or f"repository:{self.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        if self.auth and not realm.startswith("https://") and not self.base.startswith("http://"):
            # The registry is spoken to over TLS: its credentials never go out in clear text.
            raise PullError(
                f"{self.base} names the token service {realm}, which is not https: "
                "the registry's credentials are not sent there"
            )
        headers = {"Authorization": basic(self.auth)} if self.auth else {}
        async with self.session.get(realm, params=query, headers=headers) as resp:
            if resp.status != 200:
                raise PullError(f"token from {realm} refused: {await registry_error(resp)}")
            doc = await resp.json(content_type=None)
        token = doc.get("token") or doc.get("access_token")
        if not token:
            raise PullError(f"{realm} answered without a token")
        return str(token)


class AuthedGet:
    """``async with`` a GET that retries once with the credentials a 401 challenge asked for."""

    def __init__(self, repo: RepoClient, url: str, headers: dict[str, str]) -> None:
        self.repo, self.url, self.headers = repo, url, headers
        self._resp: aiohttp.ClientResponse | None = None

    async def _send(self) -> aiohttp.ClientResponse:
        headers = dict(self.headers)
        if self.repo._authorization:
            headers["Authorization"] = self.repo._authorization
        return await self.repo.session.get(self.url, headers=headers)

    async def __aenter__(self) -> aiohttp.ClientResponse:
        resp = await self._send()
        if resp.status == 401:
            challenge = resp.headers.get("WWW-Authenticate", "")
            if self.repo._authorization and not challenge.lower().startswith("bearer"):
                raise PullError(
                    f"{self.url}: the registry refused the credentials ({await registry_error(resp)})"
                )
            resp.release()
            await self.repo.authorize(challenge)
            resp = await self._send()
            if resp.status == 401:
                raise PullError(
                    f"{self.url}: the registry refused the credentials ({await registry_error(resp)})"
                )
        self._resp = resp
        return resp

    async def __aexit__(self, *exc: object) -> None:
        if self._resp is not None:
            self._resp.release()
