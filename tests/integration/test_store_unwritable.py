"""A data directory that is 100 % full or read-only: reads keep working, writes say why they cannot.

The data directory is a small tmpfs mounted by the test (root only); the test skips loudly where
mounting is not permitted.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cloud.config import resolve_settings
from cloud.store import ReadOnlyError, Registry


def _mount(cmd: list[str]) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot {' '.join(cmd)} here ({done.stderr.strip()}): the full-disk tests need root")


@pytest.fixture
def data_dir(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "data"
    mount_point.mkdir()
    _mount(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)])
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def _registered(data: Path, tmp_path: Path) -> Path:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"weights" * 100)
    registry = Registry.open(resolve_settings(data))
    try:
        registry.register(model, "m")
    finally:
        registry.close()
    return model


def _fill(folder: Path) -> None:
    with open(folder / "filler", "wb") as out:
        try:
            while True:
                out.write(b"\0" * 65536)
        except OSError:
            pass


def _edgectl(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloud.cli", "--data-dir", str(data), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_full_data_dir_reads_work_and_writes_name_the_cause(data_dir: Path, tmp_path: Path) -> None:
    model = _registered(data_dir, tmp_path)
    _fill(data_dir)
    registry = Registry.open(resolve_settings(data_dir))
    try:
        assert registry.db.read_only is not None and "is full" in registry.db.read_only
        assert [v.version for v in registry.list_versions()] == [1]
        assert registry.show("m", 1).name == "m"
        out = tmp_path / "out"
        registry.download("m", 1, out)
        assert (out / "m.onnx").read_bytes() == model.read_bytes()
        with pytest.raises(ReadOnlyError, match=f"data directory {data_dir} is full"):
            registry.register(model, "m")
        with pytest.raises(ReadOnlyError, match="can show its state but not change it"):
            registry.delete("m", 1)
    finally:
        registry.close()
    listed = _edgectl(data_dir, "model", "list")
    assert listed.returncode == 0 and "m " in listed.stdout, listed
    assert "is full" in listed.stderr  # the warning says the state is read-only, and why
    refused = _edgectl(data_dir, "model", "delete", "m:1")
    assert refused.returncode == 1 and "is full (" in refused.stderr, refused
    assert "disk I/O error" not in refused.stderr


def test_read_only_data_dir_names_the_cause(data_dir: Path, tmp_path: Path) -> None:
    _registered(data_dir, tmp_path)
    _mount(["mount", "-o", "remount,ro", str(data_dir)])
    registry = Registry.open(resolve_settings(data_dir))
    try:
        assert [v.version for v in registry.list_versions()] == [1]
        with pytest.raises(ReadOnlyError, match="is on a read-only file system"):
            registry.delete("m", 1)
    finally:
        registry.close()
    fresh = data_dir / "nested"
    missing = _edgectl(fresh, "model", "list")
    assert missing.returncode == 1, missing
    assert "unable to open database file" not in missing.stderr
    assert "read-only file system" in missing.stderr.lower(), missing
