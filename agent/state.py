"""The agent's durable state: what it applied, what was last good, and restart bookkeeping.

``AgentState`` is an immutable value with pure transitions (``applied``, ``became_healthy``,
``rolled_back``, ``failed``, ``with_book``); ``StateStore`` keeps it in one JSON file, written
atomically (temp file in the same folder, fsync, rename, fsync of the folder) with the previous
file kept as ``<name>.prev``. A SIGKILL or power cut at any moment leaves a complete old or new
file. On start the agent loads it and restores its modules from ``active`` without waiting for the
broker. One agent owns a state file; ``save`` blocks on fsync, so call it off the event loop.
"""

from __future__ import annotations

import glob
import logging
import os
import shutil
import tempfile
from datetime import datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.restart import RestartBook
from modules.contract import DeploymentStatus, DesiredState, format_validation_error

log = logging.getLogger(__name__)

STATE_FORMAT = 1


class AgentState(BaseModel):
    """Everything the agent must remember across restarts.

    ``last_applied`` is the newest admitted desired state (the one the agent tried last; its
    generation is what a new message must exceed), ``applied_at`` when it was applied (the start
    of its health deadline), ``last_known_good`` the newest desired state that became healthy.
    ``status``/``reason`` describe ``last_applied``: ``applying`` until healthy, ``failed`` or
    ``rolled_back`` (the agent then runs ``last_known_good``). ``restart_books`` survive restarts
    so back-off continues where it was.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    format: int = STATE_FORMAT
    last_applied: DesiredState | None = None
    applied_at: datetime | None = None
    last_known_good: DesiredState | None = None
    status: DeploymentStatus | None = None
    reason: str | None = None
    restart_books: dict[str, RestartBook] = Field(default_factory=dict)

    @property
    def active(self) -> DesiredState | None:
        """The desired state to run now: the last known good after a rollback, else the last applied."""
        return self.last_known_good if self.status == "rolled_back" else self.last_applied

    @property
    def last_generation(self) -> int:
        """The generation a new desired state must exceed (0 before any was applied)."""
        return self.last_applied.generation if self.last_applied is not None else 0

    def applied(self, desired: DesiredState, now: datetime) -> AgentState:
        """After admitting ``desired`` and starting to apply it at ``now``."""
        return self.model_copy(
            update={"last_applied": desired, "applied_at": now, "status": "applying", "reason": None}
        )

    def became_healthy(self) -> AgentState:
        """After every module of ``last_applied`` became healthy: it is the last known good now."""
        return self.model_copy(
            update={"last_known_good": self.last_applied, "status": "healthy", "reason": None}
        )

    def rolled_back(self, reason: str) -> AgentState:
        """After ``last_applied`` failed and the agent went back to ``last_known_good``."""
        if self.last_known_good is None:
            raise ValueError("cannot roll back: there is no last known good desired state")
        return self.model_copy(update={"status": "rolled_back", "reason": reason})

    def failed(self, reason: str) -> AgentState:
        """After ``last_applied`` failed and stays in place."""
        return self.model_copy(update={"status": "failed", "reason": reason})

    def with_book(self, module: str, book: RestartBook | None) -> AgentState:
        """With ``module``'s restart book replaced (``None`` forgets it)."""
        books = dict(self.restart_books)
        if book is None:
            books.pop(module, None)
        else:
            books[module] = book
        return self.model_copy(update={"restart_books": books})


class StateStore:
    """One ``AgentState`` in a JSON file at ``path``, with ``<path>.prev`` as the previous version."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.prev = self.path.with_name(self.path.name + ".prev")
        self._temp_prefix = f".{self.path.name}."

    def load(self) -> AgentState:
        """The stored state: the file, else the ``.prev`` backup, else an empty state.

        A file that does not parse is renamed to ``<name>.corrupt`` (kept for inspection) and
        logged as an error; leftovers of interrupted saves are removed.
        """
        self._remove_temp_files()
        for candidate in (self.path, self.prev):
            try:
                data = candidate.read_bytes()
            except FileNotFoundError:
                continue
            try:
                state = AgentState.model_validate_json(data)
            except ValidationError as e:
                corrupt = candidate.with_name(candidate.name + ".corrupt")
                os.replace(candidate, corrupt)
                log.error(
                    "state file %s is corrupt, moved to %s:\n%s",
                    candidate,
                    corrupt,
                    format_validation_error(e, str(candidate)),
                )
                continue
            if candidate == self.prev:
                log.error("state restored from the backup %s; the newest change may be lost", candidate)
            return state
        if self.path.with_name(self.path.name + ".corrupt").exists():
            log.error("no readable state in %s or its backup: starting from an empty state", self.path)
        return AgentState()

    def save(self, state: AgentState) -> None:
        """Write ``state`` atomically; the file it replaces becomes ``<name>.prev``."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = state.model_dump_json().encode()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=self._temp_prefix, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if self.path.exists():
                self._keep_previous()
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.path.parent)

    def _keep_previous(self) -> None:
        """Make the current file the ``.prev`` backup, never leaving the main path missing."""
        staged = self.path.with_name(f"{self._temp_prefix}prev.tmp")
        staged.unlink(missing_ok=True)
        try:
            os.link(self.path, staged)
        except OSError:  # filesystems without hard links (FAT on SD cards): copy instead
            shutil.copyfile(self.path, staged)
            with open(staged, "rb") as f:
                os.fsync(f.fileno())
        os.replace(staged, self.prev)

    def _remove_temp_files(self) -> None:
        if not self.path.parent.is_dir():
            return
        for leftover in self.path.parent.glob(f"{glob.escape(self._temp_prefix)}*.tmp"):
            leftover.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
