"""Layers are registry data: unpacking ``/module`` never reaches outside the folder it unpacks into."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from agent.runtime.image_load import _apply_layer


def _layer(tmp_path: Path, name: str, entries: list[tuple[str, bytes | None, str | None]]) -> Path:
    """A layer tar: ``(name, file bytes or None for a folder, link target or None)``."""
    path = tmp_path / f"{name}.tar"
    with tarfile.open(path, "w") as tar:
        for entry, data, link in entries:
            info = tarfile.TarInfo(entry)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            elif data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "work" / "unpack"
    root.mkdir(parents=True)
    return root


def test_layers_apply_in_order_with_whiteouts(tmp_path: Path, root: Path) -> None:
    base = [("module", None, None), ("module/module.json", b"{}", None), ("module/old.txt", b"x", None)]
    _apply_layer(_layer(tmp_path, "one", [*base, ("etc/passwd", b"ignored", None)]), root)
    _apply_layer(_layer(tmp_path, "two", [("./module/.wh.old.txt", b"", None)]), root)
    assert sorted(p.name for p in (root / "module").iterdir()) == ["module.json"]
    assert not (root / "etc").exists()  # only /module is unpacked


@pytest.mark.parametrize(
    "entry",
    ["module/../../../outside/.wh.victim", "../module/.wh.victim", "module/../../../.wh..wh..opq"],
)
def test_a_whiteout_outside_the_image_is_refused(tmp_path: Path, root: Path, entry: str) -> None:
    victim = tmp_path / "work" / "victim"
    victim.write_text("keep me")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "victim").write_text("keep me")
    with pytest.raises(ValueError, match="outside the image"):
        _apply_layer(_layer(tmp_path, "evil", [("module", None, None), (entry, b"", None)]), root)
    assert victim.read_text() == "keep me"
    assert (tmp_path / "outside" / "victim").read_text() == "keep me"


def test_a_whiteout_through_a_link_out_of_the_image_is_refused(tmp_path: Path, root: Path) -> None:
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_text("keep me")
    (root / "module").mkdir()
    (root / "module" / "escape").symlink_to(tmp_path / "secret")  # as if a layer had made it
    with pytest.raises(ValueError, match="reaches outside"):
        _apply_layer(_layer(tmp_path, "evil", [("module/escape/.wh.key", b"", None)]), root)
    assert (tmp_path / "secret" / "key").read_text() == "keep me"


def test_a_module_root_that_is_a_link_is_refused(tmp_path: Path, root: Path) -> None:
    with pytest.raises(ValueError, match="not a folder"):
        _apply_layer(_layer(tmp_path, "evil", [("module", None, "/etc")]), root)
