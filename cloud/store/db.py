"""Engine and sessions from a database URL; schema creation and its version check.

``sqlite:///path`` (the default) and ``postgresql://user@host:port/db`` are supported; a plain
``postgresql://`` URL is driven through psycopg 3. The schema is created with
``metadata.create_all`` and a ``schema_version`` row; a database written by a newer schema is
refused rather than misread.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cloud.store.devices import Device  # noqa: F401  (registers the device tables)
from cloud.store.errors import InvalidInputError, SchemaError
from cloud.store.fleet import DesiredRecord  # noqa: F401  (registers the fleet tables)
from cloud.store.models import Base, SchemaVersion

SCHEMA_VERSION = 1
SQLITE_BUSY_TIMEOUT_MS = 30_000


def normalize_url(url: str) -> str:
    """Pick the driver for a URL: psycopg 3 for PostgreSQL; InvalidInputError for other databases."""
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise InvalidInputError(f"database URL {redact_url(url)!r} is not a valid URL: {e}") from None
    if parsed.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        return url
    raise InvalidInputError(
        f"database URL {redact_url(url)!r}: unsupported database {parsed.drivername!r} "
        "(use sqlite:///path or postgresql://user@host/db)"
    )


def redact_url(url: str) -> str:
    """The URL with any password replaced, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable URL>"


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA journal_mode=WAL")
    cur.close()


class Database:
    """An engine plus a session factory; ``transaction()`` commits on success, rolls back on error."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @property
    def url(self) -> str:
        """The URL with the password hidden."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session inside one transaction."""
        with self._sessions.begin() as session:
            yield session

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def open_database(url: str) -> Database:
    """Connect, create missing tables and check the schema version."""
    driver_url = normalize_url(url)
    parsed = make_url(driver_url)
    db: Database | None = None
    try:
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(driver_url)
            event.listen(engine, "connect", _sqlite_pragmas)
        else:
            try:
                engine = create_engine(driver_url, pool_pre_ping=True)
            except ImportError:
                raise SchemaError(
                    f"database {redact_url(url)}: PostgreSQL needs psycopg 3 (pip install 'psycopg[binary]')"
                ) from None
        db = Database(engine)
        _ensure_schema(db)
    except SchemaError:
        if db is not None:
            db.dispose()
        raise
    except (SQLAlchemyError, sqlite3.Error, OSError) as e:
        if db is not None:
            db.dispose()
        raise SchemaError(f"cannot open database {redact_url(url)}: {_first_line(e)}") from e
    return db


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _ensure_schema(db: Database) -> None:
    Base.metadata.create_all(db.engine)
    with db.transaction() as s:
        row = s.scalar(select(SchemaVersion).where(SchemaVersion.id == 1))
        if row is None:
            s.add(SchemaVersion(id=1, version=SCHEMA_VERSION))
        elif row.version != SCHEMA_VERSION:
            raise SchemaError(
                f"database {db.url} has schema version {row.version}; this edgectl understands "
                f"version {SCHEMA_VERSION}"
            )
