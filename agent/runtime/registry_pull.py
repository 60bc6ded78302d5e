"""A resumable, verified OCI distribution client: the agent's own image pulls (asyncio, aiohttp).

``RegistryPuller.pull(image, auth)`` reads the manifest (Docker v2 schema 2 or OCI; a multi-arch
index or manifest list resolves to ``linux/<this machine's arch>``), then fetches the config and
every layer into the ``BlobStore``:

- a blob already in the store is never fetched again, nor a leading layer the destination
  already has (``present_layers``: Docker Engine's own images), so a model-only update moves only
  the model layer;
- a download goes to ``<digest>.partial`` and, after a link drop or an agent restart, resumes
  with an HTTP ``Range`` request from the bytes already there;
- every blob's sha256 is checked before it is kept (the manifest's too, against the pinned
  digest or the index entry): a mismatch is refused loudly (``PullError``) and deleted;
- up to ``parallel`` blobs download at once (Docker Engine fetches 3 at a time too: one TCP
  stream alone gets little of a lossy, long link), and all pulls share one ``TokenBucket`` (the
  device's bandwidth budget);
- a stalled link (no byte for ``stall_timeout_s``) or a dropped connection is retried every
  ``retry_s`` (a reconnect attempt on a dead link costs a SYN; a link that comes back is used
  again within seconds), resuming each time; after ``give_up_s`` without a new byte the pull
  fails (the partial file stays, and the next pull, after the planner's back-off, resumes it).

Auth (``agent/runtime/registry_http.py``): anonymous, HTTP basic, or the registry token flow
(``WWW-Authenticate: Bearer realm=...``, the token fetched with the credentials as basic auth).
Registries on loopback addresses and those in ``plain_http`` are spoken to over plain HTTP (like
Docker's insecure registries); others over HTTPS. ``progress`` is called with a ``PullProgress``
as bytes arrive.
"""

from __future__ import annotations

import asyncio
import json
import logging
import platform
import shutil
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from agent.runtime.blobs import BlobStore, DigestMismatch, Hasher, digest_hex
from agent.runtime.pull_policy import TokenBucket
from agent.runtime.registry_http import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
    PullError,
    RepoClient,
    Tokens,
    registry_error,
    why,
)
from modules.contract import DEFAULT_REGISTRY, PullProgress, registry_of, sha256_digest, split_image_ref
from modules.hosts import is_loopback

log = logging.getLogger(__name__)

INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
IMAGE_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
CHUNK = 64 * 1024
_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64", "armv7l": "arm"}

ProgressSink = Callable[[PullProgress], None]
PresentLayers = Callable[[list[str]], int]
"""Given an image's diff ids (bottom first): how many leading layers the destination already has."""


@dataclass(frozen=True)
class Descriptor:
    """A blob named by a manifest."""

    digest: str
    size: int
    media_type: str = ""


@dataclass(frozen=True)
class PulledImage:
    """An image whose manifest, config and layers are all in the blob store, verified."""

    reference: str
    manifest_digest: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    skipped: int = 0
    """Leading layers not fetched because the destination has them (``present_layers``)."""

    @property
    def digests(self) -> frozenset[str]:
        """The blobs of the image in the store (manifest, config, layers not skipped)."""
        kept = self.layers[self.skipped :]
        return frozenset({self.manifest_digest, self.config.digest, *(d.digest for d in kept)})

    @property
    def size(self) -> int:
        """Bytes of config and layers (compressed, as stored)."""
        return self.config.size + sum(d.size for d in self.layers)


def machine_arch() -> str:
    """This machine's architecture as OCI platforms name it (``amd64``, ``arm64``, ...)."""
    machine = platform.machine().lower()
    return _ARCH.get(machine, machine)


def _is_loopback(registry: str) -> bool:
    """Whether a registry (``host``, ``host:port``, ``[v6]:port``) is on this machine."""
    return is_loopback(
        registry.rsplit(":", 1)[0] if registry.count(":") == 1 or "]:" in registry else registry
    )


def _descriptor(raw: Mapping[str, Any], where: str) -> Descriptor:
    try:
        digest, size = str(raw["digest"]), int(raw["size"])
        digest_hex(digest)
    except (KeyError, TypeError, ValueError) as e:
        raise PullError(f"{where}: a malformed descriptor ({e})") from None
    if size < 0:
        raise PullError(f"{where}: negative size {size}")
    return Descriptor(digest, size, str(raw.get("mediaType", "")))


def choose_platform(index: Mapping[str, Any], arch: str, os_name: str = "linux") -> Descriptor:
    """The index entry for ``os_name/arch``; ``PullError`` listing what the index offers otherwise."""
    offered = []
    for entry in index.get("manifests") or []:
        plat = entry.get("platform") or {}
        offered.append(f"{plat.get('os')}/{plat.get('architecture')}")
        if plat.get("os") == os_name and plat.get("architecture") == arch:
            return _descriptor(entry, "image index")
    raise PullError(f"the image has no {os_name}/{arch} variant (it offers {', '.join(offered) or 'none'})")


def parse_manifest(body: bytes) -> tuple[Descriptor, tuple[Descriptor, ...]]:
    """``(config, layers)`` of an image manifest; ``PullError`` when it is not one."""
    try:
        doc = json.loads(body)
        config = _descriptor(doc["config"], "manifest config")
        layers = tuple(_descriptor(layer, f"manifest layer {i}") for i, layer in enumerate(doc["layers"]))
    except (ValueError, KeyError, TypeError) as e:
        raise PullError(f"the manifest is not an image manifest ({e})") from None
    return config, layers


@dataclass
class _Progress:
    """Running totals of one pull, turned into ``PullProgress`` for the sink."""

    image: str
    sink: ProgressSink | None
    total: int | None = None
    done: int = 0
    resumed: int = 0
    started: float = field(default_factory=time.monotonic)
    fetched: int = 0

    def emit(self) -> None:
        if self.sink is None:
            return
        elapsed = time.monotonic() - self.started
        rate = self.fetched / elapsed if elapsed > 1 and self.fetched else None
        eta = None
        if rate and self.total is not None:
            eta = max(self.total - self.done, 0) / rate
        self.sink(
            PullProgress(
                image=self.image,
                bytes_done=self.done,
                bytes_total=self.total,
                bytes_per_s=round(rate, 1) if rate else None,
                eta_s=round(eta, 1) if eta is not None else None,
                resumed_bytes=self.resumed,
            )
        )


class RegistryPuller:
    """Pulls images into a ``BlobStore`` over HTTP(S), resuming and verifying (module docstring)."""

    def __init__(
        self,
        store: BlobStore,
        *,
        bucket: TokenBucket | None = None,
        plain_http: Collection[str] = (),
        stall_timeout_s: float = 30.0,
        retry_s: float = 2.0,
        give_up_s: float = 60.0,
        arch: str | None = None,
        min_free_bytes: int = 0,
        parallel: int = 3,
    ) -> None:
        self.store = store
        self.bucket = bucket
        self.plain_http = frozenset(plain_http)
        self.stall_timeout_s = stall_timeout_s
        self.retry_s = retry_s
        self.give_up_s = give_up_s
        self.arch = arch or machine_arch()
        self.min_free_bytes = min_free_bytes
        self.parallel = parallel
        self.bytes_received = 0
        """Body bytes received from registries by this puller (all pulls), for tests and benchmarks."""
        self._tokens: Tokens = {}
        """``Authorization`` values by (registry API, repository, credentials): new credentials
        (a rotation) never reuse what the old ones earned."""

    def _count(self, n: int) -> None:
        self.bytes_received += n

    def base_url(self, registry: str) -> str:
        """``http(s)://registry/v2`` for ``registry`` (Docker Hub's API host for ``docker.io``)."""
        host = "registry-1.docker.io" if registry == DEFAULT_REGISTRY else registry
        scheme = "http" if registry in self.plain_http or _is_loopback(registry) else "https"
        return f"{scheme}://{host}/v2"

    async def pull(
        self,
        image: str,
        auth: tuple[str, str] | None = None,
        progress: ProgressSink | None = None,
        present_layers: PresentLayers | None = None,
    ) -> PulledImage:
        """Fetch ``image`` (manifest, config, layers) into the blob store; see the module docstring.

        ``present_layers(diff_ids)`` (blocking, run in a thread) may say how many leading layers
        the destination already has (Docker Engine, from any earlier pull): those missing from the
        store are not fetched (``PulledImage.skipped``)."""
        import aiohttp  # here, not at import: an agent that never pulls does not carry it (~10 MB)

        parts = split_image_ref(image)
        registry = registry_of(image)
        repository = parts.repository
        if repository.startswith(registry + "/"):
            repository = repository[len(registry) + 1 :]
        elif registry == DEFAULT_REGISTRY and "/" not in repository:
            repository = f"library/{repository}"
        reference = parts.digest or parts.tag or "latest"
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=self.stall_timeout_s, sock_read=self.stall_timeout_s
        )
        async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
            repo = RepoClient(session, self.base_url(registry), repository, auth, self._tokens, self._count)
            manifest_digest, body = await self._manifest(repo, reference, parts.digest)
            config, layers = parse_manifest(body)
            track = _Progress(image, progress)
            track.total = config.size + sum(d.size for d in layers)
            await self._blobs(repo, [config], track)
            skipped = 0
            if present_layers is not None:
                diff_ids = _diff_ids(await asyncio.to_thread(self.store.read, config.digest), len(layers))
                skipped = await asyncio.to_thread(present_layers, diff_ids)
            fetch = []
            for i, blob in enumerate(layers):
                if i < skipped or await asyncio.to_thread(self.store.has, blob.digest):
                    track.done += blob.size
                else:
                    fetch.append(blob)
            track.emit()
            await asyncio.to_thread(self._check_disk, image, sum(b.size for b in fetch))
            await self._blobs(repo, fetch, track)
            if not await asyncio.to_thread(self.store.has, manifest_digest):
                await asyncio.to_thread(self.store.put, manifest_digest, body)
        if skipped:
            log.info("%s: %d lower layers are in Docker Engine already, not fetched", image, skipped)
        return PulledImage(image, manifest_digest, config, layers, skipped)

    async def _blobs(self, repo: RepoClient, blobs: list[Descriptor], track: _Progress) -> None:
        """Fetch ``blobs``, ``parallel`` at a time (one failure cancels the others, and is raised)."""
        gate = asyncio.Semaphore(self.parallel)
        unique = list(dict.fromkeys(blobs))

        async def one(blob: Descriptor) -> None:
            async with gate:
                await self._blob(repo, blob, track)

        tasks = [asyncio.create_task(one(blob)) for blob in unique]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def _check_disk(self, image: str, needed: int) -> None:
        """``PullError`` (before any byte is fetched) when ``needed`` bytes would leave less than
        ``min_free_bytes`` free where the blobs go."""
        self.store.root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.store.root).free
        if free - needed < self.min_free_bytes:
            raise PullError(
                f"disk low: {image} needs {needed / 1e6:.1f} MB more, {free / 1e6:.1f} MB are free in "
                f"{self.store.root} and {self.min_free_bytes / 1e6:.1f} MB must stay free (pull.min_free_mb)"
            )

    async def _manifest(self, repo: RepoClient, reference: str, pinned: str | None) -> tuple[str, bytes]:
        """The image manifest's digest and bytes (through an index when the reference names one)."""
        if pinned is not None and await asyncio.to_thread(self.store.has, pinned):
            body = await asyncio.to_thread(self.store.read, pinned)
            if json.loads(body).get("mediaType") not in INDEX_TYPES:
                return pinned, body  # pinned and kept from an earlier pull: no registry needed
        media_type, body = await repo.manifest(reference)
        actual = sha256_digest(body)
        if pinned is not None and actual != pinned:
            raise PullError(f"the registry sent a manifest with digest {actual} for {pinned}: refused")
        doc = _json(body, "manifest")
        kind = doc.get("mediaType") or media_type
        if kind in INDEX_TYPES or "manifests" in doc:
            child = choose_platform(doc, self.arch)
            _, body = await repo.manifest(child.digest)
            actual = sha256_digest(body)
            if actual != child.digest:
                raise PullError(
                    f"the registry sent a manifest with digest {actual} for {child.digest}: refused"
                )
        elif kind not in IMAGE_TYPES and "layers" not in doc:
            raise PullError(f"unsupported manifest type {kind!r} (schema 1 images are not supported)")
        return actual, body

    async def _blob(self, repo: RepoClient, blob: Descriptor, track: _Progress) -> None:
        """Download one blob into the store, resuming after link drops; verify it."""
        import aiohttp

        store = self.store
        if await asyncio.to_thread(store.has, blob.digest):
            return
        loop = asyncio.get_running_loop()
        last_progress = loop.time()
        while True:
            have = await asyncio.to_thread(store.partial_size, blob.digest)
            if have > blob.size:
                await asyncio.to_thread(store.remove, [blob.digest])
                have = 0
            if have:
                track.resumed += have
                track.done += have
                log.info("resuming %s of %s at byte %d of %d", blob.digest[:19], track.image, have, blob.size)
            before = have
            try:
                have = await self._fetch(repo, blob, have, track)
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionError) as exc:
                now_have = await asyncio.to_thread(store.partial_size, blob.digest)
                track.done -= now_have  # re-counted from the partial file on the next round
                if now_have > before:
                    last_progress = loop.time()
                elif loop.time() - last_progress >= self.give_up_s:
                    raise PullError(
                        f"link to {repo.base} lost while fetching {blob.digest} ({why(exc)}); "
                        f"{now_have} of {blob.size} bytes kept, the next pull resumes there"
                    ) from None
                delay = self.retry_s
                log.warning(
                    "pull of %s: %s; %d of %d bytes of %s kept, resuming in %.0f s",
                    track.image,
                    why(exc),
                    now_have,
                    blob.size,
                    blob.digest[:19],
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            return

    async def _fetch(self, repo: RepoClient, blob: Descriptor, have: int, track: _Progress) -> int:
        """One GET of the blob from byte ``have``; returns the size once verified and committed."""
        import aiohttp

        store = self.store
        headers = {"Range": f"bytes={have}-"} if have else {}
        async with repo.get(f"blobs/{blob.digest}", headers) as resp:
            if resp.status == 416 and have:  # the partial is whole already (or longer than the blob)
                return await self._commit(blob, have)
            if resp.status not in (200, 206):
                raise PullError(f"blob {blob.digest}: {await registry_error(resp)}")
            if resp.status == 200 and have:
                log.info(
                    "the registry ignored the Range request: %s starts again from zero", blob.digest[:19]
                )
                track.done -= have
                track.resumed -= have
                have = 0
            hasher = await asyncio.to_thread(Hasher.resume, store.partial(blob.digest), have)
            f = await asyncio.to_thread(store.open_partial, blob.digest, have)
            try:
                last_emit = 0.0
                async for chunk in resp.content.iter_chunked(CHUNK):
                    if self.bucket is not None:
                        await self.bucket.take(len(chunk))
                    self.bytes_received += len(chunk)
                    have += len(chunk)
                    if have > blob.size:
                        raise PullError(f"blob {blob.digest} is longer than the manifest's {blob.size} bytes")
                    hasher.update(chunk)
                    await asyncio.to_thread(f.write, chunk)
                    track.done += len(chunk)
                    track.fetched += len(chunk)
                    if time.monotonic() - last_emit >= 0.5:
                        last_emit = time.monotonic()
                        track.emit()
            finally:
                await asyncio.to_thread(f.close)
        if have != blob.size:
            raise aiohttp.ClientPayloadError(f"connection ended at byte {have} of {blob.size}")
        try:
            await asyncio.to_thread(store.commit, blob.digest, hasher.digest())
        except DigestMismatch as e:
            track.done -= have
            raise PullError(str(e)) from None
        track.emit()
        return have

    async def _commit(self, blob: Descriptor, have: int) -> int:
        hasher = await asyncio.to_thread(Hasher.resume, self.store.partial(blob.digest), have)
        try:
            await asyncio.to_thread(self.store.commit, blob.digest, hasher.digest())
        except DigestMismatch as e:
            raise PullError(str(e)) from None
        return have


def _diff_ids(config: bytes, count: int) -> list[str]:
    """The config's ``rootfs.diff_ids``; ``PullError`` unless there is one per layer."""
    try:
        diff_ids = [str(d) for d in json.loads(config)["rootfs"]["diff_ids"]]
    except (ValueError, KeyError, TypeError) as e:
        raise PullError(f"the image config has no rootfs.diff_ids ({e})") from None
    if len(diff_ids) != count:
        raise PullError(f"the image config names {len(diff_ids)} layers, the manifest {count}")
    return diff_ids


def _json(body: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise PullError(f"the {what} is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise PullError(f"the {what} is not a JSON object")
    return doc
