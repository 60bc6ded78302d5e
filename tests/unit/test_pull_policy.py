"""The pull budget and window (pure), the tracker's progress and window wait, the blob store, the
``docker load`` archive and manifest parsing: no registry, no engine."""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiohttp
import pytest

from agent.runtime.blobs import BlobStore, DigestMismatch, Hasher
from agent.runtime.image_load import docker_archive
from agent.runtime.pull_policy import TokenBucket, UpdateWindow
from agent.runtime.pulls import PullTracker
from agent.runtime.registry_http import RepoClient
from agent.runtime.registry_pull import (
    Descriptor,
    PulledImage,
    PullError,
    RegistryPuller,
    choose_platform,
    parse_manifest,
)
from modules.contract import PullProgress, sha256_digest


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_lets_a_burst_through_then_paces_at_the_rate() -> None:
    clock = Clock()
    bucket = TokenBucket(1000, burst=500, clock=clock)
    assert bucket.delay_for(500) == 0.0
    assert bucket.delay_for(250) == pytest.approx(0.25)
    clock.t += 0.25
    assert bucket.delay_for(250) == 0.0
    # A chunk larger than the burst passes once the bucket is full, and is paid for afterwards.
    clock.t += 10
    assert bucket.delay_for(2000) == 0.0
    assert bucket.delay_for(100) == pytest.approx(1.6)


def test_token_bucket_rejects_a_rate_of_zero() -> None:
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(0)


async def test_token_bucket_holds_the_rate_over_many_chunks() -> None:
    bucket = TokenBucket(200_000, burst=10_000)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(10):
        await bucket.take(10_000)
    # 100 kB at 200 kB/s with a 10 kB burst: at least 0.45 s (a lower bound, not a timing target).
    assert loop.time() - start >= 0.44


WINDOW_CASES = {
    "inside a same-day window": ("01:00-05:00", "02:30", True, "02:30"),
    "before it: opens today": ("01:00-05:00", "00:10", False, "01:00"),
    "after it: opens tomorrow": ("01:00-05:00", "06:00", False, "01:00+1"),
    "end is exclusive": ("01:00-05:00", "05:00", False, "01:00+1"),
    "wrapping midnight, late evening": ("22:00-04:00", "23:59", True, "23:59"),
    "wrapping midnight, early morning": ("22:00-04:00", "03:00", True, "03:00"),
    "wrapping midnight, midday": ("22:00-04:00", "12:00", False, "22:00"),
}


@pytest.mark.parametrize(("text", "now", "inside", "opens"), WINDOW_CASES.values(), ids=WINDOW_CASES.keys())
def test_update_window(text: str, now: str, inside: bool, opens: str) -> None:
    day = datetime(2026, 12, 6, tzinfo=timezone.utc)

    def at(hhmm: str) -> datetime:
        clock, _, plus = hhmm.partition("+")
        h, m = clock.split(":")
        return day + timedelta(days=int(plus or 0), hours=int(h), minutes=int(m))

    window = UpdateWindow.parse(text)
    assert window.contains(at(now)) is inside
    assert window.next_open(at(now)) == at(opens)


@pytest.mark.parametrize("bad", ["1:00-05:00", "01:00-01:00", "25:00-01:00", "01:00", "01:00 - 02:00"])
def test_update_window_rejects_bad_text(bad: str) -> None:
    with pytest.raises(ValueError, match=r"HH:MM-HH:MM|empty"):
        UpdateWindow.parse(bad)


async def test_a_pull_outside_the_window_waits_and_says_until_when() -> None:
    now = datetime(2026, 12, 6, 12, 0, tzinfo=timezone.utc)
    tracker = PullTracker(window=UpdateWindow.parse("01:00-05:00"), clock=lambda: now)
    started = asyncio.Event()

    async def fetch() -> None:
        started.set()

    tracker.start("r/x:1", fetch)
    await asyncio.sleep(0.05)
    images = tracker.availability([])
    assert images.is_pulling("r/x:1") and not started.is_set()
    assert tracker.pulling == frozenset()  # nothing downloads: the agent need not poll
    assert images.progress["r/x:1"].waiting_until == datetime(2026, 12, 7, 1, 0, tzinfo=timezone.utc)
    await tracker.close()


async def test_progress_is_handed_on_at_most_every_interval() -> None:
    tracker = PullTracker(progress_every_s=3600)
    release = asyncio.Event()

    async def fetch() -> None:
        tracker.report("r/x:1", PullProgress(image="r/x:1", bytes_done=10, bytes_total=100))
        await release.wait()

    tracker.start("r/x:1", fetch)
    await asyncio.sleep(0.05)
    first = tracker.availability([]).progress["r/x:1"]
    tracker.report("r/x:1", PullProgress(image="r/x:1", bytes_done=90, bytes_total=100))
    assert tracker.availability([]).progress["r/x:1"] == first  # a report per interval, not per chunk
    release.set()
    await tracker.wait("r/x:1")
    assert tracker.availability(["r/x:1"]).progress == {}


def test_blob_store_keeps_only_verified_blobs(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    data = b"layer bytes" * 100
    digest = sha256_digest(data)
    with store.open_partial(digest, 0) as f:
        f.write(data[:500])
    assert store.partial_size(digest) == 500 and not store.has(digest)
    hasher = Hasher.resume(store.partial(digest), 500)
    with store.open_partial(digest, 500) as f:
        f.write(data[500:])
    hasher.update(data[500:])
    store.commit(digest, hasher.digest())
    assert store.read(digest) == data and store.partial_size(digest) == 0
    other = sha256_digest(b"other")
    with store.open_partial(other, 0) as f:
        f.write(b"tampered")
    with pytest.raises(DigestMismatch, match="refused"):
        store.commit(other, sha256_digest(b"tampered"))
    assert not store.partial(other).exists() and not store.has(other)
    with pytest.raises(ValueError, match="unsupported digest"):
        store.path("md5:abc")


def test_docker_archive_is_a_docker_save_layout(tmp_path: Path) -> None:
    store = BlobStore(tmp_path)
    config, one, two = b'{"rootfs": {}}', b"layer-one", b"layer-two"
    for data in (config, one, two):
        store.put(sha256_digest(data), data)
    image = PulledImage(
        "reg/x:1",
        "sha256:" + "f" * 64,
        Descriptor(sha256_digest(config), len(config)),
        (Descriptor(sha256_digest(one), len(one)), Descriptor(sha256_digest(two), len(two))),
    )
    archive = b"".join(docker_archive(store, image, "reg/x:1"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
        assert manifest[0]["RepoTags"] == ["reg/x:1"]
        layers = [tar.extractfile(name).read() for name in manifest[0]["Layers"]]  # type: ignore[union-attr]
        assert layers == [one, two]
        assert tar.extractfile(manifest[0]["Config"]).read() == config  # type: ignore[union-attr]


def test_choose_platform_names_what_the_index_offers() -> None:
    index = {
        "manifests": [
            {"digest": "sha256:" + "a" * 64, "size": 1, "platform": {"os": "linux", "architecture": "arm64"}},
            {"digest": "sha256:" + "b" * 64, "size": 2, "platform": {"os": "linux", "architecture": "amd64"}},
        ]
    }
    assert choose_platform(index, "amd64").digest == "sha256:" + "b" * 64
    with pytest.raises(PullError, match=r"no linux/riscv64 variant \(it offers linux/arm64, linux/amd64\)"):
        choose_platform(index, "riscv64")


def test_parse_manifest_refuses_what_is_not_an_image_manifest() -> None:
    with pytest.raises(PullError, match="not an image manifest"):
        parse_manifest(b'{"schemaVersion": 1, "fsLayers": []}')
    with pytest.raises(PullError, match="malformed descriptor"):
        parse_manifest(b'{"config": {"digest": "sha256:zz", "size": 1}, "layers": []}')


@pytest.mark.parametrize(
    ("registry", "plain", "url"),
    [
        ("localhost:5000", (), "http://localhost:5000/v2"),
        ("127.0.0.1:5000", (), "http://127.0.0.1:5000/v2"),
        ("10.0.0.2:5000", (), "https://10.0.0.2:5000/v2"),
        ("10.0.0.2:5000", ("10.0.0.2:5000",), "http://10.0.0.2:5000/v2"),
        ("docker.io", (), "https://registry-1.docker.io/v2"),
    ],
)
def test_base_url(registry: str, plain: tuple[str, ...], url: str, tmp_path: Path) -> None:
    assert RegistryPuller(BlobStore(tmp_path), plain_http=plain).base_url(registry) == url


async def test_credentials_never_go_to_a_token_service_in_clear_text() -> None:
    """A TLS registry whose challenge names an http:// realm gets no credentials sent there."""
    async with aiohttp.ClientSession() as session:
        repo = RepoClient(session, "https://registry.example/v2", "web", ("u", "p"), {}, lambda n: None)
        with pytest.raises(PullError, match="not https"):
            await repo.authorize('Bearer realm="http://tokens.example/token",service="registry"')
