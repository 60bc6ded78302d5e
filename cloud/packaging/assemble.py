"""Build a plan's image without a Dockerfile builder: reproducible layers, config and manifest.

Why not ``docker build``: this engine (Docker 20.10) has only the classic builder through the SDK,
which stamps the build time into the parent folders of COPY'd files and into the config's
``created`` field; two ``--no-cache`` builds of the same context gave different layer digests.
BuildKit needs the buildx plugin (not installed here), and 20.10's BuildKit predates
``SOURCE_DATE_EPOCH``. So each layer is written by ``layers.build_layer`` (sorted, fixed times and
owners, gzip without a timestamp) and the config carries ``SOURCE_DATE_EPOCH``: same inputs, same
manifest digest. The Dockerfile context (``context.write_context``) holds the same layers for
anyone who wants ``docker build``. Layers built from unchanged inputs are reused from the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cloud.packaging.base import BaseImage
from cloud.packaging.cache import BuildCache
from cloud.packaging.context import ModulePlan, python_path_over
from cloud.packaging.image import BlobRef, ImageDocuments, RuntimeSettings, build_documents
from cloud.packaging.layers import Layer, build_layer, expand_entries
from cloud.packaging.progress import Progress, human_bytes

_LAYER_FORMAT = "1"
_HASH_CONTENT_BELOW = 1 << 20


@dataclass(frozen=True)
class AssembledImage:
    """An image ready to load and push: documents plus where each layer blob is."""

    docs: ImageDocuments
    blobs: dict[str, Path]
    new_layers: list[tuple[str, Layer]]
    """``(layer name, layer)`` for the layers on top of the base."""


def _entries_key(plan_layer_entries: list[tuple[str, Path]], epoch: int) -> str:
    """A cache key for a layer: paths, sizes and mtimes of big files, contents of small ones."""
    sha = hashlib.sha256(f"layer-format {_LAYER_FORMAT} epoch {epoch}\n".encode())
    for dest, src in sorted(expand_entries(plan_layer_entries).items()):
        st = os.lstat(src)
        sha.update(f"{dest}\0{st.st_mode & 0o111 != 0}\0".encode())
        if os.path.islink(src):
            sha.update(f"link:{os.readlink(src)}".encode())
        elif st.st_size < _HASH_CONTENT_BELOW:
            sha.update(Path(src).read_bytes())
        else:
            sha.update(f"{src}\0{st.st_size}\0{st.st_mtime_ns}".encode())
        sha.update(b"\n")
    return sha.hexdigest()


def _cached_layer(cache: BuildCache, key: str) -> Layer | None:
    meta = cache.root / "layers" / f"{key}.json"
    try:
        doc = json.loads(meta.read_text())
    except (OSError, ValueError):
        return None
    path = cache.blob_path(doc["digest"])
    if not path.is_file() or path.stat().st_size != doc["size"]:
        return None
    return Layer(path, doc["digest"], doc["diff_id"], doc["size"])


def _remember_layer(cache: BuildCache, key: str, layer: Layer) -> None:
    meta_dir = cache.root / "layers"
    meta_dir.mkdir(exist_ok=True)
    tmp = meta_dir / f".{key}.tmp"
    tmp.write_text(json.dumps({"digest": layer.digest, "diff_id": layer.diff_id, "size": layer.size}))
    os.replace(tmp, meta_dir / f"{key}.json")


def assemble(
    plan: ModulePlan, base: BaseImage, cache: BuildCache, epoch: int, progress: Progress
) -> AssembledImage:
    """Build (or reuse) every layer of ``plan`` on ``base`` and the image's config and manifest."""
    new_layers: list[tuple[str, Layer]] = []
    with cache.workdir("layers-") as work:
        for i, spec in enumerate(plan.layers, 1):
            key = _entries_key(spec.entries, epoch)
            layer = _cached_layer(cache, key)
            if layer is None:
                built = build_layer(spec.entries, work / f"{i}.tar.gz", epoch)
                layer = Layer(cache.keep_blob(built), built.digest, built.diff_id, built.size)
                _remember_layer(cache, key, layer)
                state = "built"
            else:
                state = "unchanged"
            progress.step(f"  layer {spec.name}: {human_bytes(layer.size)} {state} ({layer.digest[:19]})")
            new_layers.append((spec.name, layer))
    base_config = base.config
    base_env = (base_config.get("config") or {}).get("Env") or []
    settings = RuntimeSettings(
        env={**plan.settings.env, "PYTHONPATH": python_path_over(plan, base_env)},
        cmd=plan.settings.cmd,
        workdir=plan.settings.workdir,
        exposed_ports=plan.settings.exposed_ports,
        labels={**plan.settings.labels, "org.opencontainers.image.base.digest": base.docs.manifest_digest},
    )
    layers = [*base.docs.layers(), *(BlobRef(x.digest, x.size, x.diff_id) for _, x in new_layers)]
    docs = build_documents(layers, settings, epoch, [spec.created_by for spec in plan.layers], base_config)
    blobs = {**base.blobs, **{layer.digest: layer.path for _, layer in new_layers}}
    return AssembledImage(docs, blobs, new_layers)
