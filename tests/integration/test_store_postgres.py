"""The model registry and ``edgectl model`` against a real PostgreSQL server.

The server (Debian's ``postgresql`` package) runs from a fresh ``initdb`` in a temporary folder,
on a free port on 127.0.0.1 with its socket in that folder, as the ``postgres`` user when the
tests run as root. Each test gets its own database. Without the server or psycopg 3 the tests
are skipped loudly.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import pytest
from sqlalchemy import delete, select

from cloud.cli import main
from cloud.config import Settings
from cloud.store import DiskFullError, InUseError, NotFoundError, Registry
from cloud.store import blobs as blobs_module
from cloud.store.db import SCHEMA_VERSION, open_database
from cloud.store.deployments import set_deployment_models
from cloud.store.models import Blob, Model, ModelVersion, SchemaVersion
from tests.postgres import PostgresServer
from tests.services import start_or_skip

pytestmark = pytest.mark.integration

_database_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def postgres(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("REAL PART UNAVAILABLE: postgresql: psycopg 3 missing: pip install 'psycopg[binary]'")
    workdir = Path(tempfile.mkdtemp(prefix="edge-pg-"))
    workdir.chmod(0o755)

    def start() -> PostgresServer:
        server = PostgresServer(workdir)
        server.start()
        return server

    try:
        server = start_or_skip(request.config, "postgresql", start)
        yield server
        server.stop()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def db_url(postgres: PostgresServer) -> str:
    import psycopg

    name = f"edge_test_{os.getpid()}_{next(_database_numbers)}"
    with psycopg.connect(postgres.url(), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return postgres.url(name)


@pytest.fixture
def registry(db_url: str, tmp_path: Path) -> Iterator[Registry]:
    reg = Registry.open(Settings(data_dir=tmp_path / "data", db_url=db_url))
    yield reg
    reg.close()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    (d / "sub").mkdir(parents=True)
    (d / "model.onnx").write_bytes(b"onnx" * 5000)
    (d / "sub" / "labels.txt").write_text("a\nb\n")
    return d


def test_workers_starting_together_on_an_empty_database_all_open_it(db_url: str) -> None:
    """Several cloud processes on one fresh database create its tables once, without a race."""
    start = threading.Barrier(6)

    def open_it() -> int:
        start.wait()
        db = open_database(db_url)
        try:
            with db.transaction() as s:
                return int(s.scalar(select(SchemaVersion.version)) or 0)
        finally:
            db.dispose()

    with ThreadPoolExecutor(6) as pool:
        versions = list(pool.map(lambda _i: open_it(), range(6)))
    assert versions == [SCHEMA_VERSION] * 6


def test_engine_uses_psycopg3(registry: Registry) -> None:
    assert registry.db.engine.dialect.driver == "psycopg"
    assert registry.db.engine.dialect.name == "postgresql"


def test_register_list_show_download(registry: Registry, model_dir: Path, tmp_path: Path) -> None:
    v1 = registry.register(model_dir, "iris", tags={"stage": "prod"}, description="first")
    v2 = registry.register(model_dir / "model.onnx", "iris")
    assert (v1.version, v2.version) == (1, 2)
    assert v1.created_at.tzinfo is not None
    assert {f.path: f.sha256 for f in v1.files} == {
        p.relative_to(model_dir).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in model_dir.rglob("*")
        if p.is_file()
    }
    assert [s.version for s in registry.list_versions("iris")] == [1, 2]
    assert [s.version for s in registry.list_versions(tags={"stage": "prod"})] == [1]
    assert registry.show("iris").version == 2
    with pytest.raises(NotFoundError, match=r"has no version 5 \(versions: 1, 2\)"):
        registry.show("iris", 5)
    out = tmp_path / "out"
    registry.download("iris", 1, out)
    assert (out / "sub" / "labels.txt").read_text() == "a\nb\n"
    with registry.db.transaction() as s:
        assert len(s.scalars(select(Blob)).all()) == 2


def test_in_use_versions_are_refused_by_registry_and_database(registry: Registry, model_dir: Path) -> None:
    registry.register(model_dir, "iris")
    with registry.db.transaction() as s:
        set_deployment_models(s, "plant-a", [("iris", 1)])
    with pytest.raises(InUseError, match="model iris:1 is used by deployment 'plant-a'"):
        registry.delete("iris", 1)
    with pytest.raises(Exception, match="violates foreign key constraint"), registry.db.transaction() as s:
        s.execute(delete(ModelVersion))
    with registry.db.transaction() as s:
        set_deployment_models(s, "plant-a", [])
    result = registry.delete("iris", all_versions=True)
    assert (result.versions, result.blobs_removed) == ([1], 2)
    with registry.db.transaction() as s:
        assert s.scalars(select(Model)).all() == []


def test_disk_full_leaves_no_rows(
    registry: Registry, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(src: BinaryIO, dst: BinaryIO, progress: object = None) -> tuple[str, int]:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(blobs_module, "copy_and_hash", no_space)
    with pytest.raises(DiskFullError, match="disk full while storing"):
        registry.register(model_dir, "iris")
    assert registry.list_versions() == []
    with registry.db.transaction() as s:
        assert s.scalars(select(Model)).all() == []


def test_cli_with_db_url(
    db_url: str, model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["--data-dir", str(tmp_path / "cli-data"), "--db-url", db_url]
    assert main([*common, "model", "register", str(model_dir), "--name", "digits"]) == 0
    capsys.readouterr()
    assert main([*common, "model", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(v["name"], v["version"], v["file_count"]) for v in listed] == [("digits", 1, 2)]
    assert main([*common, "model", "register", str(model_dir), "--name", "bad name"]) == 2
    assert "invalid model name" in capsys.readouterr().err


def test_unreachable_server_is_one_clear_error(
    postgres: PostgresServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql://edge@{postgres.host}:1/none"
    assert main(["--data-dir", str(tmp_path), "--db-url", url, "model", "list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"edgectl: error: cannot open database postgresql://edge@{postgres.host}:1/none: ")
    assert err.count("\n") == 1
