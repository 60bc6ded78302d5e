"""Docker Engine operations packaging needs, through the ``docker`` SDK (blocking calls).

Connecting, loading an assembled image, pulling, tagging and removing tags, and exporting an
image's layers (for vendor base images). Engine failures become one-line ``EngineError`` messages.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import docker
import docker.errors
from docker.models.images import Image

from cloud.packaging.errors import EngineError
from cloud.packaging.layers import Layer, gzip_tar_stream
from cloud.packaging.progress import Progress, follow_engine_stream


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


def pull(client: docker.DockerClient, ref: str, progress: Progress) -> None:
    """Pull ``ref`` (``repo:tag`` or ``repo@digest``), relaying layer progress."""
    repo, sep, tag = ref.rpartition("@") if "@" in ref else ref.rpartition(":")
    if not sep or "/" in tag:
        repo, tag = ref, "latest"
    try:
        follow_engine_stream(
            client.api.pull(repo, tag=tag, stream=True, decode=True), progress, f"pull {ref}"
        )
    except docker.errors.APIError as exc:
        raise EngineError(f"docker pull {ref} failed: {exc.explanation or exc}") from None


def tag(client: docker.DockerClient, image_id: str, ref: str) -> None:
    """Give a local image the name ``ref`` (``repo:tag``)."""
    repo, _, tag_name = ref.rpartition(":")
    if "/" in tag_name or not repo:
        repo, tag_name = ref, "latest"
    try:
        client.api.tag(image_id, repo, tag_name, force=True)
    except docker.errors.APIError as exc:
        raise EngineError(f"docker tag {ref} failed: {exc.explanation or exc}") from None


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
    out_dir.mkdir(parents=True, exist_ok=True)
    by_member: dict[str, Layer] = {}
    small: dict[str, bytes] = {}
    progress.step(f"exporting the layers of {ref} from Docker Engine")
    with tarfile.open(fileobj=_IterReader(stream), mode="r|") as tar:  # type: ignore[call-overload]
        for member in tar:
            if not member.isfile():
                continue
            fh = tar.extractfile(member)
            assert fh is not None
            if member.name.endswith("layer.tar"):
                tmp = out_dir / f".export-{len(by_member)}.tar.gz"
                layer = gzip_tar_stream(_chunks(fh), tmp)
                final = out_dir / (layer.digest.removeprefix("sha256:") + ".tar.gz")
                tmp.replace(final)
                by_member[member.name] = Layer(final, layer.digest, layer.diff_id, layer.size)
                progress.step(f"  layer {layer.diff_id[:19]}: {layer.size} bytes compressed")
            elif member.name.endswith(".json"):
                small[member.name] = fh.read()
    try:
        index = json.loads(small["manifest.json"])[0]
        config = small[index["Config"]]
        layers = [by_member[name] for name in index["Layers"]]
    except (KeyError, IndexError, ValueError) as exc:
        raise EngineError(f"docker save {ref} returned an archive without {exc}") from None
    return config, layers


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
