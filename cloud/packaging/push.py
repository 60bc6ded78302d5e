"""Push an assembled image to an OCI registry, moving only the blobs the repository lacks.

For each layer: already in the repository → skipped; in another repository of the same registry
(the base image's) → mounted, which moves no bytes; otherwise uploaded. Then the config and the
manifest. ``PushResult.bytes_pushed`` counts what actually went over the wire.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cloud.packaging.errors import PackagingError
from cloud.packaging.image import ImageDocuments
from cloud.packaging.progress import Progress, human_bytes
from cloud.packaging.registry_client import MANIFEST_V2, RegistryClient


@dataclass
class PushResult:
    """What one push did."""

    registry: str
    repository: str
    digest: str
    tags: list[str]
    bytes_pushed: int = 0
    uploaded: list[str] = field(default_factory=list)
    mounted: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        """``registry/repository@sha256:…``."""
        return f"{self.registry}/{self.repository}@{self.digest}"


def push_image(
    client: RegistryClient,
    repository: str,
    docs: ImageDocuments,
    blobs: Mapping[str, Path],
    tags: Sequence[str],
    progress: Progress,
    mount_from: Mapping[str, str] | None = None,
) -> PushResult:
    """Push ``docs`` and the layers they name to ``repository`` under each of ``tags``.

    ``blobs`` maps layer digests to local files; ``mount_from`` maps digests to a repository of
    the same registry that holds them. A layer in neither that the repository lacks is an error.
    """
    result = PushResult(client.address, repository, docs.manifest_digest, list(tags))
    mounts = mount_from or {}
    layers = docs.layers()
    for i, layer in enumerate(layers, 1):
        short = layer.digest.removeprefix("sha256:")[:12]
        label = f"layer {i}/{len(layers)} {short}"
        if client.blob_exists(repository, layer.digest):
            result.skipped.append(layer.digest)
            progress.step(f"  {label}: already in {repository}")
            continue
        source = mounts.get(layer.digest)
        if source and source != repository and client.mount_blob(repository, layer.digest, source):
            result.mounted.append(layer.digest)
            progress.step(f"  {label}: mounted from {source}")
            continue
        path = blobs.get(layer.digest)
        if path is None or not path.is_file():
            raise PackagingError(
                f"layer {layer.digest} is neither in {client.address}/{repository} nor in the local cache: "
                "rebuild the base image (edgectl base build --rebuild)"
            )
        progress.step(f"  {label}: pushing {human_bytes(layer.size)}")
        result.bytes_pushed += client.upload_blob(
            repository,
            path,
            layer.digest,
            functools.partial(progress.transfer, label),
        )
        result.uploaded.append(layer.digest)
    if not client.blob_exists(repository, docs.config_digest):
        with tempfile.NamedTemporaryFile(prefix="config-", suffix=".json") as tmp:
            tmp.write(docs.config)
            tmp.flush()
            result.bytes_pushed += client.upload_blob(repository, Path(tmp.name), docs.config_digest)
        result.uploaded.append(docs.config_digest)
    for tag in tags:
        digest = client.put_manifest(repository, tag, docs.manifest, MANIFEST_V2)
        result.bytes_pushed += len(docs.manifest)
        if digest and digest != docs.manifest_digest:
            raise PackagingError(
                f"registry {client.address} stored {repository}:{tag} as {digest}, "
                f"expected {docs.manifest_digest}"
            )
    progress.step(
        f"pushed {client.address}/{repository}@{docs.manifest_digest}: "
        f"{human_bytes(result.bytes_pushed)} sent ({len(result.uploaded)} blobs uploaded, "
        f"{len(result.mounted)} mounted, {len(result.skipped)} already there)"
    )
    return result
