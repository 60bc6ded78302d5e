"""The packaging cache: layer blobs by digest, base image documents by input hash, resolved Python deps.

Layout under the root (default ``<data dir>/packaging``, see ``cloud.config``)::

    blobs/sha256/<hex>       gzip layer blobs (content-addressed)
    bases/<key>.json         a base image's manifest and config
    pydeps/<key>/            site-packages resolved for one set of requirements
    work/                    scratch space for builds (removed when a build ends)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cloud.config import resolve_settings
from cloud.packaging.errors import DiskFullError, os_error
from cloud.packaging.image import ImageDocuments
from cloud.packaging.layers import Layer
from cloud.packaging.progress import human_bytes


class BuildCache:
    """Files kept between packaging runs so that unchanged inputs are not rebuilt."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = (root or resolve_settings().data_dir / "packaging").absolute()
        try:
            for sub in ("blobs/sha256", "bases", "pydeps", "work"):
                (self.root / sub).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise os_error(exc, f"creating the packaging cache {self.root}") from None

    def blob_path(self, digest: str) -> Path:
        """Where blob ``sha256:<hex>`` is (or would be) kept."""
        return self.root / "blobs" / "sha256" / digest.removeprefix("sha256:")

    def keep_blob(self, layer: Layer) -> Path:
        """Move a freshly written layer blob into the cache; returns its cached path."""
        dest = self.blob_path(layer.digest)
        if dest.exists():
            layer.path.unlink(missing_ok=True)
        else:
            os.replace(layer.path, dest)
        return dest

    def known_blobs(self, digests: list[str]) -> dict[str, Path]:
        """The cached files of those ``digests`` that are present."""
        return {d: self.blob_path(d) for d in digests if self.blob_path(d).is_file()}

    def load_documents(self, key: str) -> ImageDocuments | None:
        """A base image's documents stored under ``key``, or None."""
        path = self.root / "bases" / f"{key}.json"
        try:
            doc = json.loads(path.read_text())
            return ImageDocuments(config=doc["config"].encode(), manifest=doc["manifest"].encode())
        except (OSError, ValueError, KeyError):
            return None

    def store_documents(self, key: str, docs: ImageDocuments) -> None:
        """Remember a base image's documents under ``key``."""
        path = self.root / "bases" / f"{key}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"config": docs.config.decode(), "manifest": docs.manifest.decode()}))
        os.replace(tmp, path)

    def pydeps_dir(self, key: str) -> Path:
        """Folder for site-packages resolved under ``key`` (may not exist yet)."""
        return self.root / "pydeps" / key

    @contextmanager
    def workdir(self, prefix: str) -> Iterator[Path]:
        """A scratch folder removed on exit."""
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.root / "work"))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)

    def require_space(self, needed: int, what: str) -> None:
        """Raise DiskFullError unless ``needed`` bytes are free where the cache lives."""
        free = shutil.disk_usage(self.root).free
        if free < needed:
            raise DiskFullError(
                f"not enough free disk space for {what} in {self.root}: "
                f"{human_bytes(free)} free, about {human_bytes(needed)} needed"
            )
