"""What the fleet needs from SQL on both SQLite and PostgreSQL: bulk writes, timezone-aware times.

Bulk writes compile their statement once and hand the rows straight to the driver's
``executemany``: SQLAlchemy's per-row parameter processing would cost more than the write itself
for tens of thousands of rows. Rows therefore hold driver-ready values: ``bind_value`` converts a
value the way the column's type would (datetimes on SQLite, JSON).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import ColumnElement, Table, bindparam
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session
from sqlalchemy.sql.expression import Executable


def executemany(
    session: Session, stmt: Executable, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Run ``stmt`` once per row in one driver ``executemany``, inside the session's transaction.

    ``rows`` are tuples of driver-ready values in the order of ``columns`` (the statement's bind
    names); on a positional driver (SQLite) they go to it as they are when that order matches.
    """
    if not rows:
        return
    connection = session.connection()
    compiled = stmt.compile(dialect=connection.dialect)  # type: ignore[attr-defined]
    params: Sequence[Any]
    if compiled.positional:
        order = [columns.index(name) for name in compiled.positiontup]
        params = rows if order == list(range(len(columns))) else [tuple(r[i] for i in order) for r in rows]
    else:
        params = [dict(zip(columns, r, strict=True)) for r in rows]
    connection.exec_driver_sql(str(compiled), params)


def insert_many(
    session: Session, table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]
) -> None:
    """Insert ``rows`` (tuples of driver-ready values in the order of ``columns``)."""
    if rows:
        executemany(session, table.insert().values(_binds(table, columns)), columns, rows)


def upsert(
    session: Session,
    table: Table,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    keys: Sequence[str],
    *,
    unless_newer: str | None = None,
) -> None:
    """Insert ``rows`` (as for ``insert_many``), replacing the other columns on a conflict of ``keys``.

    With ``unless_newer`` (a time column) a stored row is replaced only when its time is not newer
    than the incoming row's: a late, older row never overwrites a newer one.
    """
    if not rows:
        return
    insert = sqlite.insert if session.get_bind().dialect.name == "sqlite" else postgresql.insert
    stmt = insert(table).values(_binds(table, columns))
    stmt = stmt.on_conflict_do_update(
        index_elements=list(keys),
        set_={column: stmt.excluded[column] for column in columns if column not in keys},
        where=None if unless_newer is None else table.c[unless_newer] <= stmt.excluded[unless_newer],
    )
    executemany(session, stmt, columns, rows)


def _binds(table: Table, columns: Sequence[str]) -> dict[str, Any]:
    return {c: bindparam(c, type_=table.c[c].type) for c in columns}


def binder(session: Session, column: ColumnElement[Any]) -> Callable[[Any], Any]:
    """Converts values the way the driver must receive them for ``column`` (a datetime as text on SQLite)."""
    dialect = session.get_bind().dialect
    processor = column.type.dialect_impl(dialect).bind_processor(dialect)
    if processor is None:
        return lambda value: value
    return lambda value: None if value is None else processor(value)


def bind_value(session: Session, column: ColumnElement[Any], value: Any) -> Any:
    """``value`` as the driver must receive it for ``column``."""
    return binder(session, column)(value)


def aware(dt: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)
