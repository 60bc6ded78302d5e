"""Database URLs, schema versioning and data-directory settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import update

from cloud.config import resolve_settings
from cloud.store.db import SCHEMA_VERSION, normalize_url, open_database, redact_url
from cloud.store.errors import InvalidInputError, SchemaError
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
