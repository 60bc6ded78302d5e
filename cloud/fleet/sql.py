"""What the fleet needs from SQL on both SQLite and PostgreSQL: bulk writes, timezone-aware times.

Bulk writes compile their statement once and hand the rows straight to the driver's
``executemany``: SQLAlchemy's per-row parameter processing would cost more than the write itself
for tens of thousands of rows. Rows therefore hold driver-ready values: ``bind_value`` converts a
value the way the column's type would (datetimes on SQLite, JSON).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ColumnElement, Table, bindparam
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Executable


def executemany(session: Session, stmt: Executable, rows: Sequence[dict[str, Any]]) -> None:
    """Run ``stmt`` once per row in one driver ``executemany``, inside the session's transaction."""
    if not rows:
        return
    connection = session.connection()
    compiled = stmt.compile(dialect=connection.dialect)  # type: ignore[attr-defined]
    if compiled.positional:
        order = compiled.positiontup
        params: list[Any] = [tuple(row[key] for key in order) for row in rows]
    else:
        params = list(rows)
    connection.exec_driver_sql(str(compiled), params)


def insert_many(session: Session, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert ``rows`` (all with the same columns, driver-ready values)."""
    if rows:
        executemany(session, table.insert().values(_binds(table, list(rows[0]))), rows)


def upsert(session: Session, table: Table, rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    """Insert ``rows`` (driver-ready values), replacing the other columns on a key conflict."""
    if not rows:
        return
    columns = list(rows[0])
    insert = sqlite.insert if session.get_bind().dialect.name == "sqlite" else postgresql.insert
    stmt = insert(table).values(_binds(table, columns))
    stmt = stmt.on_conflict_do_update(
        index_elements=list(keys),
        set_={column: stmt.excluded[column] for column in columns if column not in keys},
    )
    executemany(session, stmt, rows)


def _binds(table: Table, columns: Sequence[str]) -> dict[str, Any]:
    return {c: bindparam(c, type_=table.c[c].type) for c in columns}


def bind_value(session: Session, column: ColumnElement[Any], value: Any) -> Any:
    """``value`` as the driver must receive it for ``column`` (e.g. a datetime as text on SQLite)."""
    processor = column.type.bind_processor(session.get_bind().dialect)
    return processor(value) if processor is not None and value is not None else value


def aware(dt: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)
