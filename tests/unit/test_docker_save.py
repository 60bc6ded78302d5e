"""Reading ``docker save`` archives in both layouts: legacy and OCI (Docker Engine 25 and later).

The archives are built here, small and synthetic, and streamed in odd-sized chunks as the Engine
API would; no Docker Engine is involved.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.packaging.engine import read_saved_image
from cloud.packaging.errors import EngineError
from cloud.packaging.layers import Layer
from cloud.packaging.progress import Silent

CONFIG = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()


def layer_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def archive(members: list[tuple[str, bytes | str]]) -> Iterator[bytes]:
    """A tar of ``(name, bytes)`` files and ``(name, "->target")`` symlinks, in 1000-byte chunks."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.SYMTYPE, data.removeprefix("->")
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return (raw[i : i + 1000] for i in range(0, len(raw), 1000))


BASE = layer_tar({"etc/os-release": b"ID=test\n"})
APP = layer_tar({"app/run.py": b"print('hi')\n" * 100})


def check_layers(layers: list[Layer], expected: list[bytes], out_dir: Path) -> None:
    assert [layer.diff_id for layer in layers] == [f"sha256:{sha(t)}" for t in expected]
    for layer, tar in zip(layers, expected, strict=True):
        blob = layer.path.read_bytes()
        assert layer.path.parent == out_dir
        assert (layer.digest, layer.size) == (f"sha256:{sha(blob)}", len(blob))
        assert gzip.decompress(blob) == tar


def test_legacy_layout(tmp_path: Path) -> None:
    manifest = [
        {"Config": f"{sha(CONFIG)}.json", "RepoTags": ["base:1"], "Layers": ["aa/layer.tar", "bb/layer.tar"]}
    ]
    members: list[tuple[str, bytes | str]] = [
        ("aa/VERSION", b"1.0"),
        ("aa/json", b"{}"),
        ("aa/layer.tar", BASE),
        ("bb/layer.tar", APP),
        (f"{sha(CONFIG)}.json", CONFIG),
        ("manifest.json", json.dumps(manifest).encode()),
        ("repositories", b"{}"),
    ]
    config, layers = read_saved_image(archive(members), "base:1", tmp_path / "blobs", Silent())
    assert config == CONFIG
    check_layers(layers, [BASE, APP], tmp_path / "blobs")


def test_oci_layout_with_compressed_layers_and_links(tmp_path: Path) -> None:
    app_gz = gzip.compress(APP)
    oci_manifest = json.dumps({"schemaVersion": 2, "config": {"digest": f"sha256:{sha(CONFIG)}"}}).encode()
    manifest = [
        {
            "Config": f"blobs/sha256/{sha(CONFIG)}",
            "RepoTags": ["base:1"],
            "Layers": [f"blobs/sha256/{sha(BASE)}", "legacy/layer.tar"],  # the second through a link
        }
    ]
    members: list[tuple[str, bytes | str]] = [
        (f"blobs/sha256/{sha(BASE)}", BASE),
        (f"blobs/sha256/{sha(app_gz)}", app_gz),  # containerd's image store keeps layers compressed
        (f"blobs/sha256/{sha(CONFIG)}", CONFIG),
        (f"blobs/sha256/{sha(oci_manifest)}", oci_manifest),
        ("index.json", json.dumps({"schemaVersion": 2, "manifests": []}).encode()),
        ("legacy/layer.tar", f"->../blobs/sha256/{sha(app_gz)}"),
        ("manifest.json", json.dumps(manifest).encode()),
        ("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
    ]
    config, layers = read_saved_image(archive(members), "base:1", tmp_path / "blobs", Silent())
    assert config == CONFIG
    check_layers(layers, [BASE, APP], tmp_path / "blobs")


def test_a_layer_the_manifest_names_but_the_archive_lacks_is_named(tmp_path: Path) -> None:
    manifest = [{"Config": f"blobs/sha256/{sha(CONFIG)}", "Layers": ["blobs/sha256/feed"]}]
    members: list[tuple[str, bytes | str]] = [
        (f"blobs/sha256/{sha(CONFIG)}", CONFIG),
        ("manifest.json", json.dumps(manifest).encode()),
    ]
    with pytest.raises(
        EngineError, match="docker save base:1 returned an archive whose layer blobs/sha256/feed"
    ):
        read_saved_image(archive(members), "base:1", tmp_path, Silent())
    with pytest.raises(EngineError, match=r"docker save base:1 returned an archive without 'manifest\.json'"):
        read_saved_image(archive(members[:1]), "base:1", tmp_path, Silent())
