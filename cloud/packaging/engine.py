"""Docker Engine operations packaging needs, through the ``docker`` SDK (blocking calls).

Connecting, loading an assembled image, pulling, tagging and removing tags, and exporting an
image's layers (for vendor base images). Engine failures become one-line ``EngineError`` messages.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO

import docker
import docker.errors
from docker.models.images import Image

from cloud.packaging.errors import EngineError
from cloud.packaging.layers import Layer, gzip_tar_stream
from cloud.packaging.progress import Progress, follow_engine_stream
from modules.contract import ImageParts, split_image_ref


def connect(client: docker.DockerClient | None = None) -> docker.DockerClient:
    """The given client, or one from the environment (``DOCKER_HOST``) that answers ``ping``."""
    if client is not None:
        return client
    try:
        found = docker.from_env(timeout=300)
        found.ping()
        return found
    except docker.errors.DockerException as exc:
        raise EngineError(
            f"Docker Engine is not reachable ({str(exc).splitlines()[0][:160]}): "
            "start dockerd or set DOCKER_HOST"
        ) from None


def find_image(client: docker.DockerClient, ref: str) -> Image | None:
    """The local image for a reference or id, or None."""
    try:
        return client.images.get(ref)
    except docker.errors.ImageNotFound:
        return None
    except docker.errors.APIError as exc:
        raise EngineError(f"docker could not look up {ref}: {exc.explanation or exc}") from None


def load_archive(client: docker.DockerClient, archive: Path, progress: Progress) -> None:
    """``docker load`` an archive written by ``image.write_load_archive``, relaying its progress."""
    try:
        with open(archive, "rb") as fh:
            follow_engine_stream(client.api.load_image(fh, quiet=False), progress, "load")
    except docker.errors.APIError as exc:
        raise EngineError(f"docker load failed: {exc.explanation or exc}") from None


def pull(
    client: docker.DockerClient, ref: str, progress: Progress, auth: tuple[str, str] | None = None
) -> None:
    """Pull ``ref`` (``repo:tag`` or ``repo@digest``; the digest wins over a tag), relaying layer progress.

    ``auth``: ``(username, password)`` for the registry (never logged).
    """
    parts = _split(ref)
    auth_config = {"username": auth[0], "password": auth[1]} if auth else None
    try:
        follow_engine_stream(
            client.api.pull(
                parts.repository,
                tag=parts.digest or parts.tag or "latest",
                auth_config=auth_config,
                stream=True,
                decode=True,
            ),
            progress,
            f"pull {ref}",
        )
    except docker.errors.APIError as exc:
        raise EngineError(f"docker pull {ref} failed: {exc.explanation or exc}") from None


def tag(client: docker.DockerClient, image_id: str, ref: str) -> None:
    """Give a local image the name ``ref`` (``repo:tag``, ``latest`` when it has no tag)."""
    parts = _split(ref)
    if parts.digest is not None:
        raise EngineError(f"docker tag {ref}: a tag cannot name a digest; give repo:tag")
    try:
        client.api.tag(image_id, parts.repository, parts.tag or "latest", force=True)
    except docker.errors.APIError as exc:
        raise EngineError(f"docker tag {ref} failed: {exc.explanation or exc}") from None


def _split(ref: str) -> ImageParts:
    try:
        return split_image_ref(ref)
    except ValueError as exc:
        raise EngineError(str(exc)) from None


def remove_tag(client: docker.DockerClient, ref: str) -> None:
    """Remove a local tag (the image goes too when nothing else uses it); missing tags are fine."""
    try:
        client.images.remove(ref, noprune=False)
    except docker.errors.ImageNotFound:
        return
    except docker.errors.APIError as exc:
        raise EngineError(f"docker could not remove {ref}: {exc.explanation or exc}") from None


def export_image(
    client: docker.DockerClient, ref: str, out_dir: Path, progress: Progress
) -> tuple[bytes, list[Layer]]:
    """``docker save`` a local image: its config bytes, and its layers as gzip blobs in ``out_dir``.

    Layers are compressed while the archive streams in, so no uncompressed copy is kept.
    """
    try:
        stream = client.api.get_image(ref)
    except docker.errors.APIError as exc:
        raise EngineError(f"docker save {ref} failed: {exc.explanation or exc}") from None
    progress.step(f"exporting the layers of {ref} from Docker Engine")
    return read_saved_image(stream, ref, out_dir, progress)


def read_saved_image(
    chunks: Iterable[bytes], ref: str, out_dir: Path, progress: Progress
) -> tuple[bytes, list[Layer]]:
    """Read a ``docker save`` archive streamed as ``chunks``: the config bytes and the gzip layers.

    Both layouts are read: the legacy one (``<id>/layer.tar``, ``<id>.json``) and the OCI one of
    Docker Engine 25 and later (``blobs/sha256/<hex>``, layers possibly gzip-compressed already).
    Either way ``manifest.json`` names the config and the layers by their paths in the archive.
    Layer-like members are compressed into ``out_dir`` as they stream past (the manifest comes
    last); the others are kept in memory when small.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    layers: dict[str, Layer] = {}
    small: dict[str, bytes] = {}
    links: dict[str, str] = {}
    with tarfile.open(fileobj=_IterReader(iter(chunks)), mode="r|") as tar:  # type: ignore[call-overload]
        for member in tar:
            name = posixpath.normpath(member.name)
            if member.issym() or member.islnk():
                base = posixpath.dirname(name) if member.issym() else ""
                links[name] = posixpath.normpath(posixpath.join(base, member.linkname))
                continue
            if not member.isfile():
                continue
            fh = tar.extractfile(member)
            assert fh is not None
            head = fh.read(_TAR_BLOCK)
            kind = _layer_kind(name, head)
            if kind is not None:
                try:
                    layers[name] = _store_layer(_rejoin(head, fh), kind, out_dir, len(layers))
                except zlib.error as exc:
                    raise EngineError(f"docker save {ref}: layer {name} is not valid gzip: {exc}") from None
                progress.step(f"  layer {layers[name].diff_id[:19]}: {layers[name].size} bytes compressed")
            elif member.size <= _SMALL_MAX:
                small[name] = head + fh.read()

    def resolve(path: str) -> str:
        path = posixpath.normpath(path)
        for _ in range(len(links) + 1):
            if path not in links:
                return path
            path = links[path]
        raise EngineError(f"docker save {ref} returned an archive with a symlink loop at {path}")

    try:
        index = json.loads(small["manifest.json"])[0]
        config = small[resolve(index["Config"])]
        found = [layers.get(resolve(name)) for name in index["Layers"]]
    except KeyError as exc:
        raise EngineError(f"docker save {ref} returned an archive without {exc}") from None
    except (IndexError, TypeError, ValueError) as exc:
        raise EngineError(f"docker save {ref} returned an unreadable manifest.json: {exc}") from None
    missing = [name for name, layer in zip(index["Layers"], found, strict=True) if layer is None]
    if missing:
        raise EngineError(
            f"docker save {ref} returned an archive whose layer {missing[0]} is missing "
            "or not a tar (only uncompressed and gzip-compressed layers are supported)"
        )
    return config, [layer for layer in found if layer is not None]


_TAR_BLOCK = 512
_SMALL_MAX = 16 << 20
"""Non-layer members up to this size are kept (configs, manifests); larger ones are skipped."""
_GZIP_MAGIC = b"\x1f\x8b"


def _layer_kind(name: str, head: bytes) -> str | None:
    """``"tar"`` or ``"gzip"`` for a member holding a layer, else None (configs, manifests...)."""
    if name.endswith("/layer.tar") or name == "layer.tar":
        return "gzip" if head.startswith(_GZIP_MAGIC) else "tar"
    if not name.startswith("blobs/"):
        return None
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if len(head) == _TAR_BLOCK and (head[257:262] == b"ustar" or head == bytes(_TAR_BLOCK)):
        return "tar"  # a tar header, or the end-of-archive block of an empty layer
    return None


def _store_layer(chunks: Iterator[bytes], kind: str, out_dir: Path, number: int) -> Layer:
    tmp = out_dir / f".export-{number}.tar.gz"
    layer = gzip_tar_stream(_gunzip(chunks) if kind == "gzip" else chunks, tmp)
    final = out_dir / (layer.digest.removeprefix("sha256:") + ".tar.gz")
    tmp.replace(final)
    return Layer(final, layer.digest, layer.diff_id, layer.size)


def _gunzip(chunks: Iterator[bytes]) -> Iterator[bytes]:
    inflate = zlib.decompressobj(wbits=31)
    for chunk in chunks:
        while chunk:
            yield inflate.decompress(chunk)
            if not inflate.eof:
                break
            chunk = inflate.unused_data  # a further gzip member
            inflate = zlib.decompressobj(wbits=31)
    yield inflate.flush()


def _rejoin(head: bytes, fh: IO[bytes]) -> Iterator[bytes]:
    yield head
    yield from _chunks(fh)


def _chunks(fh: IO[bytes]) -> Iterator[bytes]:
    while chunk := fh.read(1 << 20):
        yield chunk


class _IterReader:
    """A read()-able file over an iterator of byte chunks."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self.chunks = iter(chunks)
        self.current = b""
        self.offset = 0

    def read(self, n: int = -1) -> bytes:
        parts: list[bytes] = []
        wanted = n
        while wanted != 0:
            if self.offset >= len(self.current):
                try:
                    self.current, self.offset = next(self.chunks), 0
                except StopIteration:
                    break
                continue
            end = len(self.current) if wanted < 0 else min(len(self.current), self.offset + wanted)
            parts.append(self.current[self.offset : end])
            if wanted > 0:
                wanted -= end - self.offset
            self.offset = end
        return b"".join(parts)
