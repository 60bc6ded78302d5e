"""The pure image GC decision: what the agent pulled goes once nothing needed it for the grace period."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from agent.runtime.blobs import BlobStore
from agent.runtime.image_gc import GcDecision, ImageBook, PulledRecord, collect, unreferenced_blobs

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)
GRACE = timedelta(hours=1)
A, B, C = "reg/a:1", "reg/b:1", "reg/c:1"

CASES: dict[str, tuple[dict[str, PulledRecord], set[str], tuple[str, ...], dict[str, datetime | None]]] = {
    "needed: kept, nothing marked": ({A: PulledRecord()}, {A}, (), {A: None}),
    "newly unneeded: marked now, kept": ({A: PulledRecord()}, set(), (), {A: NOW}),
    "unneeded for less than the grace: kept": (
        {A: PulledRecord(unused_since=NOW - GRACE + timedelta(seconds=1))},
        set(),
        (),
        {A: NOW - GRACE + timedelta(seconds=1)},
    ),
    "unneeded for the grace: removed": ({A: PulledRecord(unused_since=NOW - GRACE)}, set(), (A,), {}),
    "needed again within the grace: the mark is cleared": (
        {A: PulledRecord(unused_since=NOW - timedelta(minutes=5))},
        {A},
        (),
        {A: None},
    ),
    "only the unneeded one goes": (
        {A: PulledRecord(), B: PulledRecord(unused_since=NOW - 2 * GRACE), C: PulledRecord()},
        {A, C},
        (B,),
        {A: None, C: None},
    ),
    "a kept reference the agent never pulled changes nothing": ({}, {A}, (), {}),
}


@pytest.mark.parametrize(("book", "keep", "remove", "marks"), CASES.values(), ids=CASES.keys())
def test_collect(
    book: dict[str, PulledRecord], keep: set[str], remove: tuple[str, ...], marks: dict[str, datetime | None]
) -> None:
    decision = collect(book, keep, NOW, GRACE)
    assert decision.remove == remove
    assert {ref: r.unused_since for ref, r in decision.book.items()} == marks


def test_blobs_of_remaining_images_stay() -> None:
    book = {A: PulledRecord(frozenset({"sha256:1", "sha256:2"})), B: PulledRecord(frozenset({"sha256:2"}))}
    after = collect(book, {B}, NOW, timedelta(0))
    after = collect(after.book, {B}, NOW, timedelta(0))
    assert after == GcDecision((A,), {B: PulledRecord(frozenset({"sha256:2"}))})
    assert unreferenced_blobs({"sha256:1", "sha256:2", "sha256:3"}, after.book) == {"sha256:1", "sha256:3"}


def test_book_round_trip_and_unreadable_book(tmp_path: Path) -> None:
    book = ImageBook(tmp_path / "images.json")
    assert book.load() == {}
    book.add(A, {"sha256:1"})
    book.save({**book.load(), B: PulledRecord(unused_since=NOW)})
    assert book.load() == {A: PulledRecord(frozenset({"sha256:1"})), B: PulledRecord(unused_since=NOW)}
    (tmp_path / "images.json").write_text("{not json")
    assert book.load() == {}  # nothing is collected for images the agent no longer knows it pulled


def test_partial_downloads_untouched_for_the_grace_period_are_swept(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    now = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)
    whole = "sha256:" + "a" * 64
    old, fresh = "sha256:" + "b" * 64, "sha256:" + "c" * 64
    store.folder.mkdir(parents=True)
    store.path(whole).write_bytes(b"whole")
    for digest, age in ((old, timedelta(days=2)), (fresh, timedelta(hours=1)), (whole, timedelta(days=9))):
        path = store.partial(digest) if digest != whole else store.path(digest)
        if digest != whole:
            path.write_bytes(b"x" * 10)
        stamp = (now - age).timestamp()
        os.utime(path, (stamp, stamp))
    assert store.sweep_partials(now, timedelta(days=1)) == 10
    assert not store.partial(old).exists()
    assert store.partial(fresh).exists() and store.path(whole).exists()  # resumable, and verified blobs stay
    assert store.sweep_partials(now, timedelta(days=1)) == 0
