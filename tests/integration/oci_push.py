"""Images made byte by byte and pushed to a real registry (with the cloud's registry client; no Docker).

``layer({path: bytes})`` builds a gzip'd tar layer; ``push_image`` uploads the layers and a config
(Docker v2 schema 2 or OCI manifest) and returns a ``PushedImage`` with every digest, so tests
know exactly which bytes a pull must move. ``random_bytes`` is incompressible, so a layer's size
on the wire is what the test asks for.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cloud.packaging.registry_client import Credentials, RegistryClient
from modules.contract import sha256_digest

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def random_bytes(n: int) -> bytes:
    """``n`` incompressible bytes."""
    return os.urandom(n)


@dataclass(frozen=True)
class Layer:
    """A layer blob (gzip'd tar) and its diff id (digest of the uncompressed tar)."""

    blob: bytes
    diff_id: str

    @property
    def digest(self) -> str:
        return sha256_digest(self.blob)


def layer(files: dict[str, bytes | None]) -> Layer:
    """A layer with ``files`` (path → content; ``None`` writes a whiteout that deletes the path)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        folders: set[str] = set()
        for path in sorted(files):
            parts = path.split("/")
            for i in range(1, len(parts)):
                folder = "/".join(parts[:i])
                if folder not in folders:
                    folders.add(folder)
                    info = tarfile.TarInfo(folder)
                    info.type, info.mode = tarfile.DIRTYPE, 0o755
                    tar.addfile(info)
            content = files[path]
            name = path if content is not None else "/".join([*parts[:-1], ".wh." + parts[-1]])
            data = content or b""
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    uncompressed = raw.getvalue()
    return Layer(gzip.compress(uncompressed, compresslevel=1, mtime=0), sha256_digest(uncompressed))


@dataclass(frozen=True)
class PushedImage:
    """What was pushed: the reference, the manifest's digest and bytes, config and layers."""

    reference: str
    manifest_digest: str
    manifest: bytes
    config: bytes
    layers: tuple[Layer, ...]

    @property
    def size(self) -> int:
        """Config plus layers, compressed: the bytes a pull of everything moves (manifest aside)."""
        return len(self.config) + sum(len(x.blob) for x in self.layers)


def upload_blob(client: RegistryClient, repository: str, blob: bytes) -> str:
    """Upload one blob (with the cloud's registry client); returns its digest."""
    digest = sha256_digest(blob)
    if client.blob_exists(repository, digest):
        return digest
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blob"
        path.write_bytes(blob)
        client.upload_blob(repository, path, digest)
    return digest


def _push_manifest(
    client: RegistryClient, repository: str, layers: list[Layer], arch: str, ref: str | None
) -> tuple[str, bytes, bytes]:
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["/module/run"]},
            "rootfs": {"type": "layers", "diff_ids": [x.diff_id for x in layers]},
        },
        sort_keys=True,
    ).encode()
    upload_blob(client, repository, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "size": len(config), "digest": sha256_digest(config)},
            "layers": [{"mediaType": DOCKER_LAYER, "size": len(x.blob), "digest": x.digest} for x in layers],
        }
    ).encode()
    digest = sha256_digest(manifest)
    client.put_manifest(repository, ref or digest, manifest, DOCKER_MANIFEST)
    return digest, manifest, config


def push_image(
    registry: str,
    repository: str,
    tag: str,
    layers: list[Layer],
    *,
    arch: str = "amd64",
    index: bool = False,
    credentials: tuple[str, str] | None = None,
) -> PushedImage:
    """Push ``layers`` with a config as ``registry/repository:tag``; with ``index``, tag an OCI
    index of this image for ``arch`` and a decoy for another architecture."""
    client = RegistryClient(registry, Credentials(*credentials) if credentials else None)
    for x in layers:
        upload_blob(client, repository, x.blob)
    digest, manifest, config = _push_manifest(client, repository, layers, arch, None if index else tag)
    if index:
        other = "arm64" if arch != "arm64" else "amd64"
        decoy, decoy_manifest, _ = _push_manifest(client, repository, layers, other, None)
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [
                {
                    "mediaType": DOCKER_MANIFEST,
                    "size": len(m),
                    "digest": d,
                    "platform": {"os": "linux", "architecture": a},
                }
                for d, m, a in ((decoy, decoy_manifest, other), (digest, manifest, arch))
            ],
        }
        client.put_manifest(repository, tag, json.dumps(doc).encode(), OCI_INDEX)
    return PushedImage(f"{registry}/{repository}:{tag}", digest, manifest, config, tuple(layers))
