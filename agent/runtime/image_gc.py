"""Image garbage collection on the device: what the agent pulled and no longer needs goes, after a grace.

Only images this agent pulled itself are ever considered: ``ImageBook`` (``<state_dir>/images.json``,
written atomically) lists them with the blobs they are made of and, once nothing needs them, since
when. ``collect`` is pure: given the book, the references to keep (the desired state's, the last
known good one's, and those of every module that still exists) and the time, it says which
references to remove now and returns the book updated. An image needed again before its grace
period ends is simply kept. ``unreferenced_blobs`` names the blobs of the store no remaining image
uses (a partial download is never one of them: it is not a verified blob yet).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path

from agent.runtime.blobs import BlobStore

log = logging.getLogger(__name__)

BOOK_FILE = "images.json"


@dataclass(frozen=True)
class PulledRecord:
    """An image this agent pulled: its blobs (empty for an engine pull), and since when it is unneeded."""

    blobs: frozenset[str] = frozenset()
    unused_since: datetime | None = None


@dataclass(frozen=True)
class GcDecision:
    """What to remove now, and the book to keep afterwards (without the removed references)."""

    remove: tuple[str, ...]
    book: Mapping[str, PulledRecord] = field(default_factory=dict)


def collect(
    book: Mapping[str, PulledRecord], keep: Collection[str], now: datetime, grace: timedelta
) -> GcDecision:
    """The references of ``book`` unneeded for at least ``grace`` (removed), the rest updated."""
    remove: list[str] = []
    updated: dict[str, PulledRecord] = {}
    for ref, record in sorted(book.items()):
        if ref in keep:
            updated[ref] = replace(record, unused_since=None)
        elif record.unused_since is None:
            updated[ref] = replace(record, unused_since=now)
        elif now - record.unused_since >= grace:
            remove.append(ref)
        else:
            updated[ref] = record
    return GcDecision(tuple(remove), updated)


def unreferenced_blobs(stored: Iterable[str], book: Mapping[str, PulledRecord]) -> set[str]:
    """Blobs in the store that no image of ``book`` is made of."""
    used = set().union(*(r.blobs for r in book.values())) if book else set()
    return set(stored) - used


class ImageBook:
    """The images this agent pulled, kept in one JSON file (atomic replace). Blocking: off the loop;
    ``add`` and ``update`` may run in several worker threads at once (pulls end in parallel)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def load(self) -> dict[str, PulledRecord]:
        """The book; empty when there is none yet, or when it cannot be read (logged: nothing is
        removed for images the agent no longer knows it pulled)."""
        try:
            raw = json.loads(self.path.read_text())
            return {
                ref: PulledRecord(
                    frozenset(entry.get("blobs", [])),
                    datetime.fromisoformat(entry["unused_since"]) if entry.get("unused_since") else None,
                )
                for ref, entry in raw.items()
            }
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, AttributeError, TypeError) as e:
            log.warning(
                "image book %s is unreadable (%s): no image is collected until it is rewritten", self.path, e
            )
            return {}

    def save(self, book: Mapping[str, PulledRecord]) -> None:
        """Write the book (temp file, fsync, rename)."""
        data = {
            ref: {
                "blobs": sorted(r.blobs),
                "unused_since": r.unused_since.isoformat() if r.unused_since else None,
            }
            for ref, r in sorted(book.items())
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def add(self, ref: str, blobs: Collection[str] = ()) -> None:
        """Record that the agent pulled ``ref`` (made of ``blobs``); it is needed now."""
        with self._lock:
            book = self.load()
            book[ref] = PulledRecord(frozenset(blobs))
            self.save(book)

    def update(self, change: Callable[[dict[str, PulledRecord]], dict[str, PulledRecord]]) -> None:
        """Replace the book with ``change(book)``, with no ``add`` in between."""
        with self._lock:
            before = self.load()
            after = change(dict(before))
            if after != before:
                self.save(after)


def sweep_partials(store: BlobStore, now: datetime, grace: timedelta) -> None:
    """Delete the store's partial downloads abandoned for ``grace`` and say what that freed."""
    freed = store.sweep_partials(now, grace)
    if freed:
        log.info("removed partial downloads nobody resumed for %s (%d bytes)", grace, freed)
