"""Model registry on a real SQLite file and a real blob directory under tmp_path."""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import pytest
from sqlalchemy import delete, func, select, text
from sqlalchemy.exc import IntegrityError

from cloud.config import resolve_settings
from cloud.store import (
    CorruptBlobError,
    DiskFullError,
    InUseError,
    InvalidInputError,
    NotFoundError,
    Registry,
)
from cloud.store import blobs as blobs_module
from cloud.store.blobs import BlobStore, StagedBlob
from cloud.store.deployments import set_deployment_models
from cloud.store.models import Blob, Model, ModelFile, ModelVersion


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry.open(resolve_settings(tmp_path / "data", env={}))
    yield reg
    reg.close()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"\x08\x07onnx-bytes" * 1000)
    (d / "sub" / "labels.txt").write_text("setosa\nversicolor\nvirginica\n")
    (d / "empty.bin").write_bytes(b"")
    return d


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def blob_files(reg: Registry) -> list[Path]:
    return sorted(p for p in (reg.blobs.root / "sha256").rglob("*") if p.is_file())


def temp_files(reg: Registry) -> list[Path]:
    tmp = reg.blobs.root / "tmp"
    return sorted(tmp.iterdir()) if tmp.exists() else []


def count(reg: Registry, table: type) -> int:
    with reg.db.transaction() as s:
        return s.scalar(select(func.count()).select_from(table)) or 0


def test_register_folder_records_files_sizes_and_hashes(registry: Registry, model_dir: Path) -> None:
    v = registry.register(model_dir, "iris", tags={"team": "vision"}, description="first")
    assert (v.name, v.version, v.framework, v.description) == ("iris", 1, "onnx", "first")
    assert v.tags == {"team": "vision"}
    expected = {
        p.relative_to(model_dir).as_posix(): (p.stat().st_size, sha(p))
        for p in model_dir.rglob("*")
        if p.is_file()
    }
    assert {f.path: (f.size, f.sha256) for f in v.files} == expected
    assert v.size == sum(size for size, _ in expected.values())
    assert v.file_count == 3
    assert v.created_at.tzinfo is not None
    for f in v.files:
        assert sha(registry.blobs.path(f.sha256)) == f.sha256


def test_versions_increment_per_name_and_are_never_reused(registry: Registry, model_dir: Path) -> None:
    onnx = model_dir / "model.onnx"
    assert [registry.register(onnx, "a").version for _ in range(3)] == [1, 2, 3]
    assert registry.register(onnx, "b").version == 1
    registry.delete("a", 3)
    assert registry.register(onnx, "a").version == 4
    assert [(s.name, s.version) for s in registry.list_versions()] == [("a", 1), ("a", 2), ("a", 4), ("b", 1)]


def test_identical_bytes_are_stored_once(registry: Registry, model_dir: Path) -> None:
    registry.register(model_dir, "one")
    registry.register(model_dir, "two")
    registry.register(model_dir / "model.onnx", "three")
    distinct = {sha(p) for p in model_dir.rglob("*") if p.is_file()}
    assert {p.name for p in blob_files(registry)} == distinct
    assert count(registry, Blob) == len(distinct)
    assert temp_files(registry) == []


def test_single_file_is_stored_under_its_name(registry: Registry, model_dir: Path) -> None:
    v = registry.register(model_dir / "sub" / "labels.txt", "labels", framework="custom")
    assert [f.path for f in v.files] == ["labels.txt"]
    assert v.framework == "custom"


def test_framework_is_guessed_from_suffixes(registry: Registry, tmp_path: Path) -> None:
    (tmp_path / "m.pkl").write_bytes(b"pickle")
    assert registry.register(tmp_path / "m.pkl", "sk").framework == "sklearn"


def test_list_filters_by_name_and_tags(registry: Registry, model_dir: Path) -> None:
    onnx = model_dir / "model.onnx"
    registry.register(onnx, "a", tags={"stage": "prod", "team": "x"})
    registry.register(onnx, "a", tags={"stage": "dev"})
    registry.register(onnx, "b", tags={"stage": "prod"})
    assert [(s.name, s.version) for s in registry.list_versions("a")] == [("a", 1), ("a", 2)]
    prod = registry.list_versions(tags={"stage": "prod"})
    assert [(s.name, s.version) for s in prod] == [("a", 1), ("b", 1)]
    assert registry.list_versions(tags={"stage": "prod", "team": "x"})[0].tags == {
        "stage": "prod",
        "team": "x",
    }
    assert registry.list_versions("nope") == []


def test_show_latest_and_missing(registry: Registry, model_dir: Path) -> None:
    registry.register(model_dir, "m")
    registry.register(model_dir / "model.onnx", "m")
    assert registry.show("m").version == 2
    assert registry.show("m", 1).file_count == 3
    with pytest.raises(NotFoundError, match=r"model 'm' has no version 7 \(versions: 1, 2\)"):
        registry.show("m", 7)
    with pytest.raises(NotFoundError, match="model 'ghost' is not registered"):
        registry.show("ghost")


def test_download_reconstructs_files(registry: Registry, model_dir: Path, tmp_path: Path) -> None:
    registry.register(model_dir, "m")
    out = tmp_path / "out"
    result = registry.download("m", None, out)
    assert result.version == 1
    for p in model_dir.rglob("*"):
        if p.is_file():
            assert (out / p.relative_to(model_dir)).read_bytes() == p.read_bytes()
    with pytest.raises(InvalidInputError, match=r"already exists \(pass --force to overwrite\)"):
        registry.download("m", 1, out)
    (out / "model.onnx").write_bytes(b"changed")
    registry.download("m", 1, out, overwrite=True)
    assert (out / "model.onnx").read_bytes() == (model_dir / "model.onnx").read_bytes()


def test_download_detects_a_corrupt_blob_and_writes_nothing(
    registry: Registry, model_dir: Path, tmp_path: Path
) -> None:
    v = registry.register(model_dir, "m")
    victim = registry.blobs.path(next(f.sha256 for f in v.files if f.path == "sub/labels.txt"))
    victim.chmod(0o644)
    victim.write_text("tampered")
    out = tmp_path / "out"
    with pytest.raises(CorruptBlobError, match="is corrupt: its content hashes to"):
        registry.download("m", 1, out)
    assert [p for p in out.rglob("*") if p.is_file()] == []


def test_download_reports_a_missing_blob(registry: Registry, model_dir: Path, tmp_path: Path) -> None:
    v = registry.register(model_dir / "model.onnx", "m")
    registry.blobs.path(v.files[0].sha256).unlink()
    with pytest.raises(CorruptBlobError, match="is missing"):
        registry.download("m", 1, tmp_path / "out")


def test_delete_refuses_a_version_in_use_and_names_the_deployment(
    registry: Registry, model_dir: Path
) -> None:
    registry.register(model_dir, "m")
    registry.register(model_dir, "m")
    with registry.db.transaction() as s:
        set_deployment_models(s, "line-3-cameras", [("m", 1)])
    assert registry.show("m", 1).deployments == ["line-3-cameras"]
    with pytest.raises(InUseError, match=r"model m:1 is used by deployment 'line-3-cameras'"):
        registry.delete("m", 1)
    with pytest.raises(InUseError, match="line-3-cameras"):
        registry.delete("m", all_versions=True)
    assert [s.version for s in registry.list_versions("m")] == [1, 2]
    registry.delete("m", 2)
    with registry.db.transaction() as s:
        set_deployment_models(s, "line-3-cameras", [])
    assert registry.delete("m", 1).versions == [1]


def test_database_refuses_deleting_a_used_version_even_behind_the_registry(
    registry: Registry, model_dir: Path
) -> None:
    registry.register(model_dir, "m")
    with registry.db.transaction() as s:
        set_deployment_models(s, "d", [("m", 1)])
    with pytest.raises(IntegrityError), registry.db.transaction() as s:
        s.execute(delete(ModelVersion))


def test_set_deployment_models_rejects_unknown_versions(registry: Registry) -> None:
    with (
        pytest.raises(NotFoundError, match="uses model m:1, which is not registered"),
        registry.db.transaction() as s,
    ):
        set_deployment_models(s, "d", [("m", 1)])


def test_delete_keeps_shared_blobs_and_removes_orphans(
    registry: Registry, model_dir: Path, tmp_path: Path
) -> None:
    registry.register(model_dir, "m")
    other = tmp_path / "other.onnx"
    other.write_bytes(b"only in version 2")
    v2 = registry.register(other, "m")
    registry.register(model_dir / "model.onnx", "n")
    result = registry.delete("m", all_versions=True)
    assert result.versions == [1, 2]
    remaining = {p.name for p in blob_files(registry)}
    assert remaining == {sha(model_dir / "model.onnx")}
    assert v2.files[0].sha256 not in remaining
    assert result.blobs_removed == 3
    assert result.bytes_freed == other.stat().st_size + (model_dir / "sub" / "labels.txt").stat().st_size
    with registry.db.transaction() as s:
        assert s.scalars(select(Model.name)).all() == ["n"]
    assert registry.register(other, "m").version == 1


def test_delete_needs_exactly_one_selector(registry: Registry) -> None:
    with pytest.raises(InvalidInputError):
        registry.delete("m")
    with pytest.raises(InvalidInputError):
        registry.delete("m", 1, all_versions=True)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("my model", "invalid model name: 'my model' is not a valid name"),
        ("Iris", "invalid model name: 'Iris' is not a valid name"),
        ("", "invalid model name"),
    ],
)
def test_bad_names_are_refused_without_rows(
    registry: Registry, model_dir: Path, name: str, message: str
) -> None:
    with pytest.raises(InvalidInputError, match=message):
        registry.register(model_dir, name)
    assert count(registry, Model) == 0


def test_bad_inputs(registry: Registry, tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(InvalidInputError, match=f"model path {tmp_path / 'nope'} does not exist"):
        registry.register(tmp_path / "nope", "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidInputError, match="holds no files"):
        registry.register(tmp_path / "empty", "m")
    with pytest.raises(InvalidInputError, match="unknown framework 'caffe'"):
        registry.register(model_dir, "m", framework="caffe")
    with pytest.raises(InvalidInputError, match="invalid tag key 'bad key'"):
        registry.register(model_dir, "m", tags={"bad key": "v"})
    (model_dir / "dangling").symlink_to(tmp_path / "missing-target")
    with pytest.raises(InvalidInputError, match="dangling is not a regular file"):
        registry.register(model_dir, "m")
    assert count(registry, Model) == 0
    assert temp_files(registry) == []


def test_disk_full_while_staging_rolls_back_everything(
    registry: Registry, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = blobs_module.copy_and_hash
    calls = 0

    def fill_disk(
        src: BinaryIO, dst: BinaryIO, progress: blobs_module.ProgressFn | None = None
    ) -> tuple[str, int]:
        nonlocal calls
        calls += 1
        if calls == 2:
            dst.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, progress)

    monkeypatch.setattr(blobs_module, "copy_and_hash", fill_disk)
    with pytest.raises(
        DiskFullError, match=r"disk full while storing .*model\.onnx: No space left on device"
    ):
        registry.register(model_dir, "m")
    assert count(registry, Model) == 0
    assert count(registry, ModelFile) == 0
    assert count(registry, Blob) == 0
    assert temp_files(registry) == []
    assert blob_files(registry) == []


def test_disk_full_while_placing_blobs_rolls_back_rows_and_placed_blobs(
    registry: Registry, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry.register(model_dir / "sub" / "labels.txt", "existing")
    before = blob_files(registry)
    real_commit = BlobStore.commit
    placed = 0

    def commit(self: BlobStore, staged: StagedBlob) -> bool:
        nonlocal placed
        if placed == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        placed += 1
        return real_commit(self, staged)

    monkeypatch.setattr(BlobStore, "commit", commit)
    with pytest.raises(DiskFullError, match=r"disk full while storing model\.onnx"):
        registry.register(model_dir, "m")
    assert [s.name for s in registry.list_versions()] == ["existing"]
    assert count(registry, Blob) == 1
    assert blob_files(registry) == before
    assert temp_files(registry) == []


def test_progress_reports_every_byte(registry: Registry, model_dir: Path) -> None:
    seen: list[tuple[int, int, str]] = []
    v = registry.register(model_dir, "m", progress=lambda done, total, f: seen.append((done, total, f)))
    assert seen[-1][0] == seen[-1][1] == v.size
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
    assert {f for _, _, f in seen} <= {f.path for f in v.files}


def test_sqlite_foreign_keys_are_on(registry: Registry) -> None:
    with registry.db.engine.connect() as conn:
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
