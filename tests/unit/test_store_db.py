"""Database URLs, schema versioning and data-directory settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import update

from cloud.config import resolve_settings
from cloud.store.db import SCHEMA_VERSION, normalize_url, open_database, redact_url
from cloud.store.errors import InvalidInputError, SchemaError
from cloud.store.fleet import OnlineRecord
from cloud.store.models import SchemaVersion


def test_postgresql_urls_use_psycopg3() -> None:
    assert (
        normalize_url("postgresql://edge@127.0.0.1:5432/edge")
        == "postgresql+psycopg://edge@127.0.0.1:5432/edge"
    )
    assert normalize_url("postgres://u:pw@h/db") == "postgresql+psycopg://u:pw@h/db"
    assert normalize_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"


def test_unsupported_and_malformed_urls_are_refused_without_leaking_passwords() -> None:
    with pytest.raises(InvalidInputError, match="unsupported database 'mysql'") as err:
        normalize_url("mysql://root:hunter2@h/db")
    assert "hunter2" not in str(err.value)
    with pytest.raises(InvalidInputError, match="is not a valid URL"):
        normalize_url("not a url")
    assert "hunter2" not in redact_url("postgresql://u:hunter2@h/db")


def test_schema_version_row_is_written_and_checked(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'nested' / 'state.db'}"
    db = open_database(url)
    with db.transaction() as s:
        assert s.get(SchemaVersion, 1).version == SCHEMA_VERSION  # type: ignore[union-attr]
        s.execute(update(SchemaVersion).values(version=SCHEMA_VERSION + 1))
    db.dispose()
    with pytest.raises(
        SchemaError, match=f"has schema version {SCHEMA_VERSION + 1}; this edgectl understands"
    ):
        open_database(url)


def test_unreachable_database_is_one_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SchemaError, match=r"cannot open database sqlite:.*File exists"):
        open_database(f"sqlite:///{blocker / 'state.db'}")


def test_settings_precedence(tmp_path: Path) -> None:
    env = {"EDGE_DATA_DIR": str(tmp_path / "env"), "EDGE_DB_URL": "postgresql://edge@127.0.0.1/edge"}
    assert resolve_settings(env={}).data_dir == Path("~/.edgedeploy").expanduser()
    from_env = resolve_settings(env=env)
    assert from_env.data_dir == tmp_path / "env"
    assert from_env.db_url == "postgresql://edge@127.0.0.1/edge"
    from_flags = resolve_settings(tmp_path / "flag", "sqlite:///x.db", env=env)
    assert (from_flags.data_dir, from_flags.db_url) == (tmp_path / "flag", "sqlite:///x.db")
    default = resolve_settings(tmp_path / "flag", env={})
    assert default.db_url == f"sqlite:///{tmp_path / 'flag' / 'edgedeploy.db'}"
    assert default.blob_dir == tmp_path / "flag" / "blobs"


def test_a_version_1_database_is_upgraded_in_place(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.executescript(
        "CREATE TABLE schema_version (id INTEGER PRIMARY KEY, version INTEGER NOT NULL);"
        "INSERT INTO schema_version VALUES (1, 1);"
        "CREATE TABLE device_online (device_id VARCHAR(128) PRIMARY KEY, online BOOLEAN NOT NULL,"
        " since DATETIME NOT NULL, received_at DATETIME NOT NULL);"
        "INSERT INTO device_online VALUES ('cam-1', 1, '2026-01-01 00:00:00', '2026-01-01 00:00:00');"
    )
    con.commit()
    con.close()
    db = open_database(f"sqlite:///{path}")
    try:
        with db.transaction() as s:
            assert s.get(SchemaVersion, 1).version == SCHEMA_VERSION  # type: ignore[union-attr]
            row = s.get(OnlineRecord, "cam-1")
            assert (
                row is not None
                and row.online
                and (row.session, row.instance, row.ordering) == (None, None, 0)
            )
    finally:
        db.dispose()
