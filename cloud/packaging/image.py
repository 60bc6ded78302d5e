"""Image assembly: a config and a manifest from layers, and a ``docker load`` archive.

An image here is what a registry stores: gzip layer blobs, a config JSON and a manifest naming
both by digest. Both JSON documents are written canonically (sorted keys, no spaces) with a fixed
``created`` time, so the same layers and settings always give the same manifest digest.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cloud.packaging.registry_client import MANIFEST_V2
from modules.contract import canonical_json, sha256_digest

CONFIG_MEDIA_TYPE = "application/vnd.docker.container.image.v1+json"
LAYER_MEDIA_TYPE = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DEFAULT_EPOCH = 315532800


def source_date_epoch() -> int:
    """The fixed time written into images: ``$SOURCE_DATE_EPOCH``, else 1980-01-01 (zip's earliest date)."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if raw:
        if not raw.isdigit():
            raise ValueError(f"SOURCE_DATE_EPOCH must be a whole number of seconds, got {raw!r}")
        return int(raw)
    return DEFAULT_EPOCH


def timestamp(epoch: int) -> str:
    """RFC 3339 UTC time of a Unix epoch, as image configs write it."""
    return datetime.fromtimestamp(epoch, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class BlobRef:
    """A layer as a manifest lists it."""

    digest: str
    size: int
    diff_id: str


@dataclass(frozen=True)
class RuntimeSettings:
    """The container settings of an image config (``config`` in the image spec)."""

    env: Mapping[str, str] = field(default_factory=dict)
    cmd: Sequence[str] = ()
    workdir: str = ""
    exposed_ports: Sequence[str] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    def merged_over(self, base: Mapping[str, Any]) -> dict[str, Any]:
        """This image's settings on top of a base image's ``config`` section."""
        env: dict[str, str] = {}
        for item in base.get("Env") or []:
            key, _, value = str(item).partition("=")
            env[key] = value
        env.update(self.env)
        out: dict[str, Any] = {k: v for k, v in base.items() if k in ("User", "Entrypoint", "StopSignal")}
        out["Env"] = [f"{k}={v}" for k, v in env.items()]
        out["Cmd"] = list(self.cmd) if self.cmd else base.get("Cmd")
        out["WorkingDir"] = self.workdir or base.get("WorkingDir", "")
        ports: dict[str, dict[str, Any]] = {port: {} for port in base.get("ExposedPorts") or {}}
        ports.update({port: {} for port in self.exposed_ports})
        if ports:
            out["ExposedPorts"] = dict(sorted(ports.items()))
        labels = dict(base.get("Labels") or {})
        labels.update(self.labels)
        if labels:
            out["Labels"] = labels
        return {k: v for k, v in out.items() if v not in (None, "")}


@dataclass(frozen=True)
class ImageDocuments:
    """A config and a manifest, as bytes, with their digests."""

    config: bytes
    manifest: bytes

    @property
    def config_digest(self) -> str:
        """Digest of the config: the image id Docker Engine shows."""
        return sha256_digest(self.config)

    @property
    def manifest_digest(self) -> str:
        """Digest of the manifest: what ``repo@sha256:…`` references."""
        return sha256_digest(self.manifest)

    def diff_ids(self) -> list[str]:
        """The uncompressed layer digests, base first."""
        return list(json.loads(self.config)["rootfs"]["diff_ids"])

    def layers(self) -> list[BlobRef]:
        """The manifest's layers with their diff ids, base first."""
        entries = json.loads(self.manifest)["layers"]
        return [BlobRef(e["digest"], e["size"], d) for e, d in zip(entries, self.diff_ids(), strict=True)]


def build_documents(
    layers: Sequence[BlobRef],
    settings: RuntimeSettings,
    epoch: int,
    history: Sequence[str],
    base_config: Mapping[str, Any] | None = None,
) -> ImageDocuments:
    """The config and manifest of an image: ``layers`` (base first) under ``settings``.

    ``base_config`` is the base image's whole config; its history is kept and its container
    settings are the defaults that ``settings`` overrides. ``history`` has one line per new layer
    (the layers beyond the base's).
    """
    base = dict(base_config or {})
    base_history = list(base.get("history") or [])
    created = timestamp(epoch)
    new_count = len(layers) - len((base.get("rootfs") or {}).get("diff_ids") or [])
    if new_count != len(history):
        raise ValueError(f"{len(history)} history lines for {new_count} new layers")
    config = {
        "architecture": base.get("architecture", "amd64"),
        "os": base.get("os", "linux"),
        "created": created,
        "config": settings.merged_over(base.get("config") or {}),
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [*base_history, *({"created": created, "created_by": line} for line in history)],
    }
    config_bytes = canonical_json(config)
    return ImageDocuments(config=config_bytes, manifest=manifest_for(config_bytes, layers))


def manifest_for(config: bytes, layers: Sequence[BlobRef]) -> bytes:
    """The (Docker v2 schema 2) manifest of an image config and its gzip layers."""
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_V2,
        "config": {"mediaType": CONFIG_MEDIA_TYPE, "size": len(config), "digest": sha256_digest(config)},
        "layers": [
            {"mediaType": LAYER_MEDIA_TYPE, "size": layer.size, "digest": layer.digest} for layer in layers
        ],
    }
    return canonical_json(manifest)


def write_load_archive(
    out_path: Path,
    docs: ImageDocuments,
    blobs: Mapping[str, Path],
    tags: Sequence[str],
) -> None:
    """Write a ``docker load`` archive of the image.

    ``blobs`` maps layer digests to files; layers missing from it must already be in the engine
    (Docker Engine skips reading a layer whose chain it already has), which is how a base image's
    layers are left out.
    """
    manifest_layers = [f"blobs/{layer.digest.removeprefix('sha256:')}.tar.gz" for layer in docs.layers()]
    config_name = docs.config_digest.removeprefix("sha256:") + ".json"
    index = canonical_json([{"Config": config_name, "RepoTags": list(tags), "Layers": manifest_layers}])
    with tarfile.open(out_path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("manifest.json", index), (config_name, docs.config)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for layer, name in zip(docs.layers(), manifest_layers, strict=True):
            path = blobs.get(layer.digest)
            if path is not None:
                tar.add(str(path), arcname=name)
