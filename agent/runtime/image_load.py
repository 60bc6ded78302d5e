"""From verified blobs to something that runs: a ``docker load`` stream, or an unpacked ``/module``.

``docker_archive`` streams the ``docker save`` layout (``manifest.json``, the config, one file
per layer) straight from the blob store, without a temporary copy; Docker Engine accepts the
layers compressed as the registry served them and reads a layer file only when it lacks that
layer (by chain id), so the leading layers it already has (``PulledImage.skipped``) are named in
``manifest.json`` but not sent.
``unpack_module`` lays the image's ``/module`` folder out for the process runtime, applying the
layers in order (whiteouts included) into a temporary folder renamed into place when complete.
Blocking: call these off the event loop.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from agent.runtime.blobs import READ_CHUNK, BlobStore, digest_hex
from agent.runtime.registry_pull import PulledImage

BLOCK = 512
MODULE_ROOT = "module"


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _padding(size: int) -> bytes:
    return b"\0" * (-size % BLOCK)


def docker_archive(store: BlobStore, image: PulledImage, tag: str) -> Iterator[bytes]:
    """The bytes of a ``docker load`` archive of ``image`` tagged ``tag``, in chunks."""
    config_name = f"{digest_hex(image.config.digest)}.json"
    layer_names = [f"{digest_hex(d.digest)}/layer.tar" for d in image.layers]
    manifest = json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]).encode()
    yield _header("manifest.json", len(manifest)) + manifest + _padding(len(manifest))
    seen: set[str] = set()
    kept = list(zip(layer_names, image.layers, strict=True))[image.skipped :]
    for name, digest in [(config_name, image.config.digest)] + [(n, d.digest) for n, d in kept]:
        if name in seen:  # the same layer twice in one image: one file serves both
            continue
        seen.add(name)
        path = store.path(digest)
        size = path.stat().st_size
        yield _header(name, size)
        with open(path, "rb") as f:
            while chunk := f.read(READ_CHUNK):
                yield chunk
        yield _padding(size)
    yield b"\0" * (2 * BLOCK)


def unpack_module(store: BlobStore, image: PulledImage, dest: Path) -> None:
    """Unpack the image's ``/module`` folder into ``dest`` (replaced atomically when complete)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
    try:
        for layer in image.layers:
            _apply_layer(store.path(layer.digest), work)
        root = work / MODULE_ROOT
        if not (root / "module.json").is_file():
            raise ValueError(f"{image.reference} has no /{MODULE_ROOT}/module.json: not an edge module image")
        old = dest.with_name(dest.name + ".old")
        shutil.rmtree(old, ignore_errors=True)  # left by a crash between the two renames
        if dest.exists():
            os.replace(dest, old)
        os.replace(root, dest)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _apply_layer(path: Path, root: Path) -> None:
    """Apply one layer's ``module/`` entries to ``root``: whiteouts delete, the rest is extracted.

    A layer is registry data: an entry whose name leaves ``root`` (absolute, ``..``), a whiteout
    that would delete outside it, or a ``module`` folder that is a link is refused with ValueError.
    """
    if not hasattr(tarfile, "data_filter"):
        raise RuntimeError(
            "unpacking images needs tarfile's extraction filters (Python 3.10.12, 3.11.4 or newer)"
        )
    inside = root.resolve()
    with tarfile.open(path, "r:*") as tar:
        members = []
        for member in tar:
            name = _entry_name(member.name, path)
            if name != MODULE_ROOT and not name.startswith(MODULE_ROOT + "/"):
                continue
            if name == MODULE_ROOT and not member.isdir():
                raise ValueError(f"layer {path.name}: /{MODULE_ROOT} is not a folder ({member.name!r})")
            folder, _, base = name.rpartition("/")
            if base == ".wh..wh..opq":
                target = _within(root / folder, inside, member.name, path)
                if target.is_dir():
                    for child in target.iterdir():
                        _delete(child)
                continue
            if base.startswith(".wh."):
                _delete(_within(root / folder / base[len(".wh.") :], inside, member.name, path))
                continue
            member.name = name
            members.append(member)
        tar.extractall(root, members=members, filter="data")
    if (root / MODULE_ROOT).is_symlink():
        raise ValueError(f"layer {path.name}: /{MODULE_ROOT} is a link, not a folder")


def _entry_name(name: str, layer: Path) -> str:
    """A layer entry's name relative to the image root; ValueError when it would leave the root."""
    clean = posixpath.normpath(name.lstrip("/"))
    if clean == ".." or clean.startswith("../") or posixpath.isabs(clean):
        raise ValueError(f"layer {layer.name}: entry {name!r} points outside the image")
    return "" if clean == "." else clean


def _within(target: Path, inside: Path, name: str, layer: Path) -> Path:
    """``target`` when it resolves inside ``inside`` (links followed); ValueError otherwise."""
    if not target.parent.resolve().is_relative_to(inside):
        raise ValueError(f"layer {layer.name}: whiteout {name!r} reaches outside the image")
    return target


def _delete(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
