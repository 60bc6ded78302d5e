"""The agent's blob store: image blobs by digest under ``<state_dir>/blobs/sha256/``, verified.

A download goes to ``<hex>.partial`` and becomes ``<hex>`` only after its sha256 matched the
digest it was asked for, so a blob in the store is always whole and right. A partial file
survives a link drop and an agent restart: ``partial_size`` says where to resume (HTTP Range),
``Hasher.resume`` re-reads what is there so the digest still covers every byte. A mismatch
deletes the partial file and raises ``DigestMismatch`` (the next try starts from zero).
Blocking file work: call it off the event loop.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from modules.contract import sha256_digest

_DIGEST_RE = re.compile(r"^sha256:([a-f0-9]{64})$")
READ_CHUNK = 1 << 20


class DigestMismatch(Exception):
    """A blob's bytes do not hash to the digest the manifest names; the message says both."""


def digest_hex(digest: str) -> str:
    """The hex part of a ``sha256:<hex>`` digest; ``ValueError`` for anything else."""
    m = _DIGEST_RE.match(digest)
    if m is None:
        raise ValueError(f"unsupported digest {digest!r} (only sha256:<64 hex> is accepted)")
    return m.group(1)


class BlobStore:
    """Whole, verified blobs in ``root/sha256/<hex>`` and resumable ``<hex>.partial`` downloads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.folder = root / "sha256"

    def path(self, digest: str) -> Path:
        """Where the verified blob ``digest`` lives (whether or not it is there)."""
        return self.folder / digest_hex(digest)

    def partial(self, digest: str) -> Path:
        """Where a download of ``digest`` in progress is kept."""
        return self.folder / f"{digest_hex(digest)}.partial"

    def has(self, digest: str) -> bool:
        """True when the verified blob is in the store."""
        return self.path(digest).is_file()

    def partial_size(self, digest: str) -> int:
        """Bytes of ``digest`` already downloaded (0 when no partial file)."""
        try:
            return self.partial(digest).stat().st_size
        except FileNotFoundError:
            return 0

    def open_partial(self, digest: str, offset: int) -> BinaryIO:
        """The partial file opened for writing at ``offset`` (truncated there)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.partial(digest)
        f = open(path, "r+b" if path.exists() else "wb")  # noqa: SIM115  (the caller closes it)
        f.truncate(offset)
        f.seek(offset)
        return f

    def commit(self, digest: str, actual: str) -> Path:
        """Make the partial download of ``digest`` the verified blob, given the digest of its bytes."""
        partial = self.partial(digest)
        if actual != digest:
            partial.unlink(missing_ok=True)
            raise DigestMismatch(f"blob {digest} arrived with digest {actual}: refused and deleted")
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        final = self.path(digest)
        os.replace(partial, final)
        return final

    def put(self, digest: str, data: bytes) -> Path:
        """Store a small blob (a manifest, a config) after checking its digest."""
        actual = sha256_digest(data)
        if actual != digest:
            raise DigestMismatch(f"blob {digest} arrived with digest {actual}: refused")
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.path(digest)
        tmp = final.with_suffix(".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, final)
        return final

    def read(self, digest: str) -> bytes:
        """The bytes of a stored blob."""
        return self.path(digest).read_bytes()

    def digests(self) -> set[str]:
        """Every verified blob in the store."""
        if not self.folder.is_dir():
            return set()
        return {f"sha256:{p.name}" for p in self.folder.iterdir() if _DIGEST_RE.match(f"sha256:{p.name}")}

    def size(self, digest: str) -> int:
        """The size in bytes of a stored blob (0 when absent)."""
        try:
            return self.path(digest).stat().st_size
        except FileNotFoundError:
            return 0

    def sweep_partials(self, now: datetime, grace: timedelta) -> int:
        """Delete partial downloads nothing wrote to for ``grace`` (a pull given up on, an image no
        longer wanted); the bytes freed. Call it only while no download runs."""
        if not self.folder.is_dir():
            return 0
        cutoff = (now - grace).timestamp()
        freed = 0
        for path in self.folder.glob("*.partial"):
            with contextlib.suppress(FileNotFoundError):
                info = path.stat()
                if info.st_mtime < cutoff:
                    path.unlink()
                    freed += info.st_size
        return freed

    def remove(self, digests: Iterable[str]) -> int:
        """Delete the given blobs (and their partial files); the bytes freed."""
        freed = 0
        for digest in digests:
            for path in (self.path(digest), self.partial(digest)):
                with contextlib.suppress(FileNotFoundError):
                    freed += path.stat().st_size
                    path.unlink()
        return freed


class Hasher:
    """sha256 over a blob as it is written, resumable from what a partial file already holds."""

    def __init__(self) -> None:
        self._h = hashlib.sha256()

    @classmethod
    def resume(cls, partial: Path, size: int) -> Hasher:
        """A hasher that has seen the first ``size`` bytes of ``partial``."""
        hasher = cls()
        left = size
        if size:
            with open(partial, "rb") as f:
                while left > 0:
                    chunk = f.read(min(READ_CHUNK, left))
                    if not chunk:
                        break
                    hasher.update(chunk)
                    left -= len(chunk)
        if left:
            raise OSError(f"{partial} is shorter than {size} bytes")
        return hasher

    def update(self, data: bytes) -> None:
        """Hash more bytes."""
        self._h.update(data)

    def digest(self) -> str:
        """``sha256:<hex>`` of everything seen."""
        return "sha256:" + self._h.hexdigest()
