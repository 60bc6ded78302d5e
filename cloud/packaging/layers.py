"""Reproducible image layers: sorted tar archives with fixed metadata, gzip without a timestamp.

A layer is built from a list of ``(path in the image, source on disk)`` entries. The same entries
always give the same bytes: entries are sorted, parent folders are added with mode 0755, files get
mode 0644 (0755 when executable), owner root and the modification time ``epoch``, and gzip writes
no name and no time. ``diff_id`` is the sha256 of the tar, ``digest`` that of the gzip blob.

``rootfs_layer`` archives a whole root file system as it is (owners, modes, times, links, hard
links), for base images.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

GZIP_LEVEL = 6
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Layer:
    """A gzip-compressed layer blob on disk."""

    path: Path
    digest: str
    """``sha256:…`` of the compressed blob (what the registry stores)."""
    diff_id: str
    """``sha256:…`` of the uncompressed tar (what the image config lists)."""
    size: int
    """Compressed size in bytes."""


class _HashingWriter:
    """A write-only file that hashes and counts what passes through to ``sink``."""

    def __init__(self, sink: BinaryIO) -> None:
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.sink.write(data)

    def flush(self) -> None:
        self.sink.flush()

    def tell(self) -> int:
        return self.size


def image_path(path: str) -> PurePosixPath:
    """Normalise a path inside the image (``/module/x`` or ``module/x``) to a relative posix path."""
    p = PurePosixPath("/" + path.lstrip("/"))
    parts = [part for part in p.parts[1:] if part not in ("", ".")]
    if ".." in parts or not parts:
        raise ValueError(f"{path!r} is not a usable path inside the image")
    return PurePosixPath(*parts)


def expand_entries(entries: Iterable[tuple[str, Path]]) -> dict[PurePosixPath, Path]:
    """Map every file below each entry (folders are walked) to its path inside the image.

    Later entries win over earlier ones for the same image path; ``__pycache__`` folders are skipped.
    """
    out: dict[PurePosixPath, Path] = {}
    for dest, src in entries:
        target = image_path(dest)
        if src.is_dir() and not src.is_symlink():
            for root, dirs, files in os.walk(src):
                dirs[:] = sorted(d for d in dirs if d != "__pycache__")
                rel_root = Path(root).relative_to(src)
                for name in sorted(files):
                    rel = PurePosixPath(*rel_root.parts, name)
                    out[target / rel] = Path(root) / name
                for name in dirs:
                    full = Path(root) / name
                    if full.is_symlink():
                        out[target / PurePosixPath(*rel_root.parts, name)] = full
        else:
            out[target] = src
    return out


def _parents(paths: Iterable[PurePosixPath]) -> set[PurePosixPath]:
    found: set[PurePosixPath] = set()
    for p in paths:
        for parent in p.parents:
            if str(parent) != ".":
                found.add(parent)
    return found


def _open_blob(out_path: Path) -> tuple[BinaryIO, _HashingWriter, gzip.GzipFile, _HashingWriter]:
    raw = open(out_path, "wb")  # noqa: SIM115 - closed by _close_blob
    compressed = _HashingWriter(raw)
    gz = gzip.GzipFile(filename="", mode="wb", fileobj=compressed, compresslevel=GZIP_LEVEL, mtime=0)
    uncompressed = _HashingWriter(gz)  # type: ignore[arg-type]
    return raw, compressed, gz, uncompressed


def _close_blob(
    out_path: Path, raw: BinaryIO, compressed: _HashingWriter, gz: gzip.GzipFile, tar_sha: str
) -> Layer:
    gz.close()
    raw.close()
    return Layer(
        path=out_path,
        digest="sha256:" + compressed.sha.hexdigest(),
        diff_id="sha256:" + tar_sha,
        size=compressed.size,
    )


def build_layer(entries: Iterable[tuple[str, Path]], out_path: Path, epoch: int) -> Layer:
    """Write a reproducible layer holding ``entries`` (image path, source file or folder) to ``out_path``."""
    files = expand_entries(entries)
    dirs = _parents(files)
    names = sorted(set(files) | dirs, key=lambda p: p.parts)
    raw, compressed, gz, uncompressed = _open_blob(out_path)
    try:
        with tarfile.open(fileobj=uncompressed, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for name in names:
                src = files.get(name)
                info = tarfile.TarInfo(str(name))
                info.mtime = epoch
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                if src is None or (src.is_dir() and not src.is_symlink()):
                    info.type = tarfile.DIRTYPE
                    info.mode = 0o755
                    tar.addfile(info)
                elif src.is_symlink():
                    info.type = tarfile.SYMTYPE
                    info.linkname = os.readlink(src)
                    info.mode = 0o777
                    tar.addfile(info)
                else:
                    st = src.stat()
                    info.size = st.st_size
                    info.mode = 0o755 if st.st_mode & 0o111 else 0o644
                    with open(src, "rb") as fh:
                        tar.addfile(info, fh)
    except BaseException:
        gz.close()
        raw.close()
        out_path.unlink(missing_ok=True)
        raise
    return _close_blob(out_path, raw, compressed, gz, uncompressed.sha.hexdigest())


def _walk_rootfs(root: Path, skip: frozenset[str]) -> Iterator[tuple[str, Path]]:
    """Every path below ``root`` in sorted order, parents before children, skipping ``skip`` subtrees."""
    stack = [PurePosixPath()]
    while stack:
        rel = stack.pop()
        full = root.joinpath(*rel.parts)
        with os.scandir(full) as it:
            children = sorted(e.name for e in it)
        subdirs = []
        for name in children:
            child = rel / name
            yield str(child), full / name
            path = full / name
            if str(child) not in skip and stat.S_ISDIR(os.lstat(path).st_mode):
                subdirs.append(child)
        stack.extend(reversed(subdirs))


def rootfs_layer(root: Path, out_path: Path, *, empty_dirs: Iterable[str] = ()) -> Layer:
    """Archive a root file system as one layer, keeping owners, modes, times and links.

    Folders named in ``empty_dirs`` (e.g. ``dev``, ``proc``) are kept but archived without content.
    """
    skip = frozenset(empty_dirs)
    raw, compressed, gz, uncompressed = _open_blob(out_path)
    try:
        with tarfile.open(fileobj=uncompressed, mode="w", format=tarfile.PAX_FORMAT) as tar:  # type: ignore[call-overload]
            for name, path in _walk_rootfs(root, skip):
                info = tar.gettarinfo(str(path), arcname=name)
                info.mtime = int(info.mtime)
                info.uname = info.gname = ""
                if info.isreg():
                    with open(path, "rb") as fh:
                        tar.addfile(info, fh)
                elif info.isdir() or info.issym() or info.islnk():
                    tar.addfile(info)
    except BaseException:
        gz.close()
        raw.close()
        out_path.unlink(missing_ok=True)
        raise
    return _close_blob(out_path, raw, compressed, gz, uncompressed.sha.hexdigest())


def gzip_tar_stream(stream: Iterable[bytes], out_path: Path) -> Layer:
    """Compress an uncompressed layer tar (e.g. from ``docker save``) into a reproducible blob."""
    raw, compressed, gz, uncompressed = _open_blob(out_path)
    try:
        for chunk in stream:
            uncompressed.write(chunk)
    except BaseException:
        gz.close()
        raw.close()
        out_path.unlink(missing_ok=True)
        raise
    return _close_blob(out_path, raw, compressed, gz, uncompressed.sha.hexdigest())


def file_digest(path: Path) -> str:
    """``sha256:…`` of a file's bytes."""
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
    return "sha256:" + sha.hexdigest()
