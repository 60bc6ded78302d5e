"""A throw-away PostgreSQL server (Debian's ``postgresql`` package) on loopback, for tests and benchmarks.

It runs from a fresh ``initdb`` in a given folder, on a free port on 127.0.0.1 with its socket in
that folder, as the ``postgres`` user when run as root, with fsync off. ``ServiceUnavailable`` says
why when it cannot start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.services import ManagedProcess, ServiceUnavailable, log_tail, port_open


def _postgres_bindir() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    if not found:
        raise ServiceUnavailable("PostgreSQL server not installed: apt-get install postgresql")
    return found[-1].parent


class PostgresServer(ManagedProcess):
    """A throw-away PostgreSQL cluster: trust authentication for the ``edge`` superuser."""

    name = "postgresql"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.bindir = _postgres_bindir()
        self.data = workdir / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                raise ServiceUnavailable(
                    "running as root needs runuser (util-linux) to start PostgreSQL as postgres"
                )
            try:
                shutil.chown(workdir, "postgres", "postgres")
            except LookupError as e:
                raise ServiceUnavailable(f"no 'postgres' user to run the server as ({e})") from e
            self.as_user = [runuser, "-u", "postgres", "--"]
        initdb = [
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "edge",
            "-E",
            "UTF8",
        ]
        result = subprocess.run(
            [*self.as_user, *initdb, "--no-sync"], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ServiceUnavailable(f"initdb failed ({result.returncode}): {result.stderr.strip()[-500:]}")

    def argv(self) -> list[str]:
        return [
            *self.as_user,
            str(self.bindir / "postgres"),
            "-D",
            str(self.data),
            "-p",
            str(self.port),
            "-k",
            str(self.workdir),
            "-c",
            f"listen_addresses={self.host}",
            "-c",
            "fsync=off",
        ]

    def ready(self) -> bool:
        return port_open(self.host, self.port) and "ready to accept connections" in log_tail(
            self.log_path, 40
        )

    def url(self, database: str = "postgres") -> str:
        """A ``postgresql://`` URL as an operator would give it to ``--db-url``."""
        return f"postgresql://edge@{self.host}:{self.port}/{database}"
