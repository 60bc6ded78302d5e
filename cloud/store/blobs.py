"""Content-addressed blob store: each distinct content is kept once, under its sha256.

Layout under the root: ``sha256/<first 2 hex>/<64 hex>`` for blobs, ``tmp/`` for files being
written, ``.lock`` to serialise the moments where blobs appear or disappear.

Writing is two-phase so that a failed registration leaves nothing behind: ``stage()`` copies the
source into ``tmp/`` while hashing it (one read), then ``commit()`` renames it into place (or drops
it when the same content is already stored) and ``discard()`` removes it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cloud.store.errors import CorruptBlobError, DiskFullError, InvalidInputError, StoreError

CHUNK = 1024 * 1024

ProgressFn = Callable[[int], None]
"""Called with the number of bytes just processed."""


@dataclass(frozen=True)
class StagedBlob:
    """A file copied into the store's temp area, not yet committed."""

    sha256: str
    size: int
    temp_path: Path


def copy_and_hash(src: BinaryIO, dst: BinaryIO, progress: ProgressFn | None = None) -> tuple[str, int]:
    """Copy ``src`` to ``dst`` in chunks; return the sha256 hex digest and the size."""
    digest = hashlib.sha256()
    size = 0
    while chunk := src.read(CHUNK):
        digest.update(chunk)
        dst.write(chunk)
        size += len(chunk)
        if progress is not None:
            progress(len(chunk))
    return digest.hexdigest(), size


class BlobStore:
    """Blobs on the local file system under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"

    def path(self, sha256: str) -> Path:
        """Where the blob with this digest lives."""
        return self.root / "sha256" / sha256[:2] / sha256

    def exists(self, sha256: str) -> bool:
        """True when the blob's file is present."""
        return self.path(sha256).is_file()

    @contextmanager
    def lock(self) -> Iterator[None]:
        """An exclusive lock across processes, held while blobs are committed or removed."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / ".lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def stage(self, src: Path, progress: ProgressFn | None = None) -> StagedBlob:
        """Copy ``src`` into the temp area while hashing it; raises DiskFullError on ENOSPC."""
        try:
            fin = open(src, "rb")  # noqa: SIM115 (closed by the with below; open errors are input errors)
        except OSError as e:
            raise InvalidInputError(f"cannot read {src}: {e.strerror or e}") from None
        with fin:
            try:
                self._tmp.mkdir(parents=True, exist_ok=True)
                fd, name = tempfile.mkstemp(dir=self._tmp, prefix="stage-")
            except OSError as e:
                raise _store_error(e, src) from e
            temp = Path(name)
            try:
                with os.fdopen(fd, "wb") as fout:
                    sha256, size = copy_and_hash(fin, fout, progress)
                    fout.flush()
                    os.fsync(fout.fileno())
            except BaseException as e:
                temp.unlink(missing_ok=True)
                if isinstance(e, OSError):
                    raise _store_error(e, src) from e
                raise
        return StagedBlob(sha256=sha256, size=size, temp_path=temp)

    def commit(self, staged: StagedBlob) -> bool:
        """Move a staged blob into place; False (and the temp file dropped) when already stored."""
        final = self.path(staged.sha256)
        if final.is_file():
            staged.temp_path.unlink(missing_ok=True)
            return False
        final.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(staged.temp_path, 0o444)
        os.replace(staged.temp_path, final)
        return True

    def discard(self, staged: StagedBlob) -> None:
        """Remove a staged blob that will not be committed."""
        staged.temp_path.unlink(missing_ok=True)

    def remove(self, sha256: str) -> None:
        """Delete a blob's file (no error if it is already gone) and its shard folder once empty."""
        path = self.path(sha256)
        path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            path.parent.rmdir()

    def copy_out(self, sha256: str, dst: BinaryIO, progress: ProgressFn | None = None) -> int:
        """Write a blob's bytes to ``dst``, checking them against the digest; returns the size."""
        try:
            with open(self.path(sha256), "rb") as fin:
                actual, size = copy_and_hash(fin, dst, progress)
        except FileNotFoundError:
            raise CorruptBlobError(f"blob {sha256} is missing from {self.root}") from None
        if actual != sha256:
            raise CorruptBlobError(f"blob {sha256} in {self.root} is corrupt: its content hashes to {actual}")
        return size


def _store_error(e: OSError, src: Path) -> StoreError:
    if e.errno == errno.ENOSPC:
        return DiskFullError(f"disk full while storing {src}: {e.strerror or e}")
    return StoreError(f"cannot store {src}: {e.strerror or e}")
