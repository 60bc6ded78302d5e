"""Images made byte by byte and pushed to a real registry over its HTTP API (no Docker needed).

``layer({path: bytes})`` builds a gzip'd tar layer; ``push_image`` uploads the layers and a config
(Docker v2 schema 2 or OCI manifest) and returns a ``PushedImage`` with every digest, so tests
know exactly which bytes a pull must move. ``random_bytes`` is incompressible, so a layer's size
on the wire is what the test asks for.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import urllib.request
from dataclasses import dataclass
from typing import Any

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


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
        return sha256(self.blob)


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
    return Layer(gzip.compress(uncompressed, compresslevel=1, mtime=0), sha256(uncompressed))


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


def _request(
    url: str, method: str = "GET", data: bytes | None = None, headers: dict[str, str] | None = None
) -> Any:
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    return urllib.request.urlopen(req, timeout=60)


def upload_blob(registry: str, repository: str, blob: bytes) -> str:
    """Upload one blob (monolithic POST + PUT); returns its digest."""
    digest = sha256(blob)
    with _request(f"http://{registry}/v2/{repository}/blobs/uploads/", "POST", b"") as resp:
        location = resp.headers["Location"]
    if location.startswith("/"):
        location = f"http://{registry}{location}"
    sep = "&" if "?" in location else "?"
    headers = {"Content-Type": "application/octet-stream"}
    with _request(f"{location}{sep}digest={digest}", "PUT", blob, headers):
        pass
    return digest


def _push_manifest(
    registry: str, repository: str, layers: list[Layer], arch: str, ref: str | None
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
    upload_blob(registry, repository, config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": DOCKER_MANIFEST,
            "config": {"mediaType": DOCKER_CONFIG, "size": len(config), "digest": sha256(config)},
            "layers": [{"mediaType": DOCKER_LAYER, "size": len(x.blob), "digest": x.digest} for x in layers],
        }
    ).encode()
    digest = sha256(manifest)
    url = f"http://{registry}/v2/{repository}/manifests/{ref or digest}"
    with _request(url, "PUT", manifest, {"Content-Type": DOCKER_MANIFEST}):
        pass
    return digest, manifest, config


def push_image(
    registry: str,
    repository: str,
    tag: str,
    layers: list[Layer],
    *,
    arch: str = "amd64",
    index: bool = False,
) -> PushedImage:
    """Push ``layers`` with a config as ``registry/repository:tag``; with ``index``, tag an OCI
    index of this image for ``arch`` and a decoy for another architecture."""
    for x in layers:
        upload_blob(registry, repository, x.blob)
    digest, manifest, config = _push_manifest(registry, repository, layers, arch, None if index else tag)
    if index:
        other = "arm64" if arch != "arm64" else "amd64"
        decoy, decoy_manifest, _ = _push_manifest(registry, repository, layers, other, None)
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
        url = f"http://{registry}/v2/{repository}/manifests/{tag}"
        with _request(url, "PUT", json.dumps(doc).encode(), {"Content-Type": OCI_INDEX}):
            pass
    return PushedImage(f"{registry}/{repository}:{tag}", digest, manifest, config, tuple(layers))
