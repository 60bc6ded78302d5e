"""Engine and sessions from a database URL; schema creation and its version check.

``sqlite:///path`` (the default) and ``postgresql://user@host:port/db`` are supported; a plain
``postgresql://`` URL is driven through psycopg 3. The schema is created with
``metadata.create_all`` and a ``schema_version`` row; a database written by a newer schema is
refused rather than misread.

A SQLite data directory that is full or read-only still opens, read-only (``Database.read_only``
says why): listing, showing and downloading keep working, and a write fails with ReadOnlyError
naming the cause instead of "disk I/O error".
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from cloud.store.credentials import RegistryCredential  # noqa: F401  (registers the credential table)
from cloud.store.devices import Device  # noqa: F401  (registers the device tables)
from cloud.store.errors import InvalidInputError, ReadOnlyError, SchemaError
from cloud.store.fleet import DesiredRecord  # noqa: F401  (registers the fleet tables)
from cloud.store.models import Base, SchemaVersion

SCHEMA_VERSION = 5
SCHEMA_LOCK_KEY = 0x65646765_64706C79
"""The PostgreSQL advisory lock held while the schema is created or upgraded."""
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Below this, SQLite cannot create its WAL index and journal: the directory counts as full.
MIN_FREE_BYTES = 256 * 1024

log = logging.getLogger(__name__)


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
    """An engine plus a session factory; ``transaction()`` commits on success, rolls back on error.

    ``read_only`` is None, or why the database could only be opened for reading.
    """

    def __init__(self, engine: Engine, read_only: str | None = None) -> None:
        self.engine = engine
        self.read_only = read_only
        self._sessions = sessionmaker(engine, expire_on_commit=False)

    @property
    def url(self) -> str:
        """The URL with the password hidden."""
        return self.engine.url.render_as_string(hide_password=True)

    def check_writable(self) -> None:
        """ReadOnlyError when the database was opened read-only; call before writing anything."""
        if self.read_only is not None:
            raise ReadOnlyError(f"{self.read_only}: edgectl can show its state but not change it")

    @contextmanager
    def transaction(self) -> Iterator[Session]:
        """A session inside one transaction; ReadOnlyError when it writes to a read-only database."""
        try:
            with self._sessions.begin() as session:
                yield session
        except OperationalError as e:
            if self.read_only is None or "readonly" not in str(e.orig).lower():
                raise
            self.check_writable()
            raise

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
        path = Path(parsed.database) if parsed.get_backend_name() == "sqlite" and parsed.database else None
        reason = unwritable_reason(path.parent) if path is not None and path.parent.is_dir() else None
        if path is None or reason is None:
            raise SchemaError(f"cannot open database {redact_url(url)}: {_first_line(e)}") from e
        return _open_read_only(path, reason)
    return db


def unwritable_reason(folder: Path) -> str | None:
    """Why ``folder`` cannot take writes now (read-only file system, permissions, no space), or None."""
    try:
        fs = os.statvfs(folder)
    except OSError:
        return None
    if fs.f_flag & os.ST_RDONLY:
        return f"data directory {folder} is on a read-only file system"
    if not os.access(folder, os.W_OK):
        return f"data directory {folder} is not writable by this user"
    free = fs.f_bavail * fs.f_frsize
    if free < MIN_FREE_BYTES:
        return f"data directory {folder} is full ({free} bytes free)"
    return None


def _open_read_only(path: Path, reason: str) -> Database:
    """The SQLite file opened immutable (no journal, no WAL index); SchemaError when that fails too."""
    if not path.exists():
        raise SchemaError(f"{reason}: edgectl needs to create its database {path} there")
    engine = create_engine(f"sqlite:///file:{path}?mode=ro&immutable=1&uri=true")
    event.listen(engine, "connect", _sqlite_read_pragmas)
    db = Database(engine, read_only=reason)
    try:
        with db.transaction() as s:
            row = s.scalar(select(SchemaVersion).where(SchemaVersion.id == 1))
    except (SQLAlchemyError, sqlite3.Error) as e:
        db.dispose()
        raise SchemaError(f"{reason}, and reading {path} failed too: {_first_line(e)}") from e
    if row is None or row.version != SCHEMA_VERSION:
        db.dispose()
        raise SchemaError(
            f"{reason}, and database {path} has schema version {row.version if row else 'none'}; "
            f"this edgectl understands version {SCHEMA_VERSION}"
        )
    log.warning("%s: opened database %s read-only", reason, path)
    return db


def _sqlite_read_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _first_line(e: BaseException) -> str:
    text = str(getattr(e, "orig", None) or e).strip()
    return text.splitlines()[0] if text else type(e).__name__


UPGRADES: dict[int, tuple[tuple[str, str, str], ...]] = {
    1: (
        ("device_online", "session", "BIGINT"),
        ("device_online", "instance", "VARCHAR(64)"),
        ("device_online", "ordering", "BIGINT NOT NULL DEFAULT 0"),
    ),
    2: (("device_reported", "heartbeat_s", "FLOAT"),),
    3: (("devices", "sealing_public_key", "VARCHAR(64)"),),
    4: (("devices", "rabbitmq_password_hash", "VARCHAR(256)"),),
}
"""The columns ``(table, column, type)`` that take a database from schema version N to N + 1
(a table that ``create_all`` just made has them already)."""


def _ensure_schema(db: Database) -> None:
    """Create missing tables and upgrade the schema, in one transaction. On PostgreSQL it holds an
    advisory lock meanwhile: cloud workers starting together on an empty database would otherwise
    race to create the same tables (one fails on PostgreSQL's catalog)."""
    with db.engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        Base.metadata.create_all(conn)
        with Session(bind=conn) as s:
            _upgrade(db, s)
            s.flush()


def _upgrade(db: Database, s: Session) -> None:
    row = s.scalar(select(SchemaVersion).where(SchemaVersion.id == 1))
    if row is None:
        s.add(SchemaVersion(id=1, version=SCHEMA_VERSION))
        return
    while row.version < SCHEMA_VERSION and row.version in UPGRADES:
        for table, column, kind in UPGRADES[row.version]:
            present = {c["name"] for c in inspect(s.connection()).get_columns(table)}
            if column not in present:
                s.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {kind}"))
        log.info("database %s: schema upgraded from version %d to %d", db.url, row.version, row.version + 1)
        row.version += 1
    if row.version != SCHEMA_VERSION:
        raise SchemaError(
            f"database {db.url} has schema version {row.version}; this edgectl understands "
            f"version {SCHEMA_VERSION}"
        )
