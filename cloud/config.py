"""Where the cloud side keeps its state: the data directory and the database URL.

Precedence for each setting: command-line flag, then environment variable, then default.

- data directory: ``--data-dir``, ``EDGE_DATA_DIR``, ``~/.edgedeploy``. It holds the SQLite file
  (when no database URL is given) and the content-addressed model blobs.
- database: ``--db-url``, ``EDGE_DB_URL``, ``sqlite:///<data dir>/edgedeploy.db``. A
  ``postgresql://`` URL puts the state in PostgreSQL; blobs stay in the data directory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "EDGE_DATA_DIR"
DB_URL_ENV = "EDGE_DB_URL"
DEFAULT_DATA_DIR = "~/.edgedeploy"
SQLITE_FILE = "edgedeploy.db"


@dataclass(frozen=True)
class Settings:
    """Resolved locations of the cloud state."""

    data_dir: Path
    db_url: str

    @property
    def blob_dir(self) -> Path:
        """Root of the content-addressed blob store."""
        return self.data_dir / "blobs"


def resolve_settings(
    data_dir: str | os.PathLike[str] | None = None,
    db_url: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Combine flags (``data_dir``, ``db_url``) with the environment and the defaults."""
    env = os.environ if env is None else env
    raw_dir = data_dir if data_dir not in (None, "") else env.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    resolved_dir = Path(os.fspath(raw_dir)).expanduser().absolute()
    url = db_url or env.get(DB_URL_ENV) or f"sqlite:///{resolved_dir / SQLITE_FILE}"
    return Settings(data_dir=resolved_dir, db_url=url)
