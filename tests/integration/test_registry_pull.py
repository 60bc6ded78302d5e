"""The agent's resumable puller against a real registry (CNCF distribution) and a real Docker Engine.

Images are pushed byte by byte (``oci_push``), so each test knows exactly how many bytes a pull
must move: a blob already in the store is never fetched again, a partial file is resumed from
where it stopped, a corrupted blob is refused and not kept, and the result loads into Docker
Engine (layers as the config's diff ids) or unpacks for the process runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.actions import Pull
from agent.runtime.blobs import BlobStore
from agent.runtime.docker import DockerRuntime
from agent.runtime.image_gc import ImageBook
from agent.runtime.process import ProcessRuntime, image_dir
from agent.runtime.pulls import PullTracker
from agent.runtime.registry_pull import PullError, RegistryPuller
from modules.contract import PullProgress, sha256_digest
from tests.integration.oci_push import Layer, layer, push_image, random_bytes
from tests.integration.token_auth import ISSUER, SERVICE, TokenIssuer, serve_tokens
from tests.services import RegistryServer, http_status, start_or_skip

MODULE_JSON = b'{"name": "digits", "version": "1", "profile": "cpu", "models": []}'


def repo() -> str:
    return f"edge13/{uuid.uuid4().hex[:10]}"


def base_layer(size: int = 200_000) -> Layer:
    return layer({"module/module.json": MODULE_JSON, "module/runtime.bin": random_bytes(size)})


def model_layer(size: int = 50_000) -> Layer:
    return layer({"module/models/m/1/model.onnx": random_bytes(size)})


def stored_blob(registry: RegistryServer, digest: str) -> Path:
    hexa = digest.split(":", 1)[1]
    return registry.workdir / "storage" / "docker/registry/v2/blobs/sha256" / hexa[:2] / hexa / "data"


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs")


async def test_pull_verifies_every_blob_and_never_fetches_one_twice(
    registry: RegistryServer, store: BlobStore
) -> None:
    pushed = push_image(registry.address, repo(), "1", [base_layer(), model_layer()])
    puller = RegistryPuller(store)
    seen: list[PullProgress] = []
    pulled = await puller.pull(pushed.reference, progress=seen.append)
    assert pulled.manifest_digest == pushed.manifest_digest
    assert [d.digest for d in pulled.layers] == [x.digest for x in pushed.layers]
    for digest in pulled.digests:
        assert store.has(digest), digest
    assert puller.bytes_received == pushed.size + len(pushed.manifest)
    assert seen[-1].bytes_done == seen[-1].bytes_total == pushed.size

    again = await RegistryPuller(store).pull(pushed.reference)
    assert again == pulled
    assert store.partial_size(pushed.layers[0].digest) == 0


async def test_a_model_only_update_moves_only_the_model_layer(
    registry: RegistryServer, store: BlobStore
) -> None:
    name = repo()
    base = base_layer()
    push_image(registry.address, name, "1", [base, model_layer()])
    await RegistryPuller(store).pull(f"{registry.address}/{name}:1")
    update = push_image(registry.address, name, "2", [base, model_layer(60_000)])
    puller = RegistryPuller(store)
    await puller.pull(update.reference)
    new_bytes = len(update.layers[1].blob) + len(update.config) + len(update.manifest)
    assert puller.bytes_received == new_bytes, (puller.bytes_received, new_bytes, len(base.blob))


async def test_a_partial_download_resumes_where_it_stopped(
    registry: RegistryServer, store: BlobStore
) -> None:
    pushed = push_image(registry.address, repo(), "1", [base_layer(300_000)])
    blob = pushed.layers[0].blob
    kept = len(blob) * 2 // 3
    partial = store.partial(pushed.layers[0].digest)
    partial.parent.mkdir(parents=True)
    partial.write_bytes(blob[:kept])  # what an agent killed mid-download leaves
    puller = RegistryPuller(store)
    seen: list[PullProgress] = []
    await puller.pull(pushed.reference, progress=seen.append)
    assert store.read(pushed.layers[0].digest) == blob
    assert not partial.exists()
    assert puller.bytes_received == len(blob) - kept + len(pushed.config) + len(pushed.manifest)
    assert seen[-1].resumed_bytes == kept


async def test_a_corrupted_blob_is_refused_loudly_and_not_kept(
    registry: RegistryServer, store: BlobStore
) -> None:
    pushed = push_image(registry.address, repo(), "1", [base_layer(100_000)])
    digest = pushed.layers[0].digest
    data = stored_blob(registry, digest)
    original = data.read_bytes()
    data.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # same size, one bit flipped
    try:
        with pytest.raises(PullError, match=f"blob {digest} arrived with digest sha256:.*refused"):
            await RegistryPuller(store).pull(pushed.reference)
    finally:
        data.write_bytes(original)
    assert not store.has(digest) and store.partial_size(digest) == 0


async def test_a_pinned_manifest_with_another_digest_is_refused(
    registry: RegistryServer, store: BlobStore
) -> None:
    pushed = push_image(registry.address, repo(), "1", [base_layer(1000)])
    other = "sha256:" + "1" * 64
    ref = pushed.reference.rsplit(":", 1)[0] + "@" + other
    with pytest.raises(PullError, match="manifest"):
        await RegistryPuller(store).pull(ref)


async def test_an_index_resolves_to_this_machines_architecture(
    registry: RegistryServer, store: BlobStore
) -> None:
    puller = RegistryPuller(store)
    pushed = push_image(registry.address, repo(), "multi", [base_layer(1000)], arch=puller.arch, index=True)
    pulled = await puller.pull(pushed.reference)
    assert pulled.manifest_digest == pushed.manifest_digest


async def test_basic_auth_registry(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "blobs")
    private = start_or_skip(
        request.config,
        "registry",
        lambda: _started(RegistryServer(tmp_path, users={"puller": "s3cret"})),
    )
    try:
        name = repo()
        layers = [base_layer(1000)]
        pushed = push_image(private.address, name, "1", layers, credentials=("puller", "s3cret"))
        puller = RegistryPuller(store)  # one puller throughout: a rotated credential is used at once
        with pytest.raises(PullError, match="needs credentials"):
            await puller.pull(pushed.reference)
        with pytest.raises(PullError, match=r"refused the credentials .*UNAUTHORIZED"):
            await puller.pull(pushed.reference, auth=("puller", "wrong"))
        pulled = await puller.pull(pushed.reference, auth=("puller", "s3cret"))
        assert pulled.manifest_digest == pushed.manifest_digest
    finally:
        private.stop()


def _started(server: RegistryServer) -> RegistryServer:
    server.start()
    return server


@pytest.fixture
def loaded_images(docker_client: Any) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    for name in names:
        with contextlib.suppress(Exception):  # the test failed before loading it
            docker_client.images.remove(name, force=True)


async def test_the_pulled_image_loads_into_docker_engine(
    registry: RegistryServer, docker_client: Any, tmp_path: Path, loaded_images: list[str]
) -> None:
    name = repo()
    pushed = push_image(registry.address, name, "1", [base_layer(), model_layer()])
    pinned = f"{registry.address}/{name}@{pushed.manifest_digest}"
    store = BlobStore(tmp_path / "blobs")
    runtime = DockerRuntime(docker_client, profiles={}, device_id="d13", puller=RegistryPuller(store))
    try:
        for ref in (pushed.reference, pinned):
            await runtime.pull(Pull(module="m", image=ref, reason="test"))
            await runtime.pulls.wait(ref)
            _, images = await runtime.observe([ref])
            assert images.is_present(ref), (ref, dict(images.failed))
        loaded_images += [
            f"{registry.address}/{name}:1",
            f"{registry.address}/{name}:{pushed.manifest_digest.replace(':', '-')}",
        ]
        image = docker_client.images.get(f"{registry.address}/{name}:1")
        assert image.attrs["RootFS"]["Layers"] == [x.diff_id for x in pushed.layers]
        assert image.id == sha256_digest(pushed.config)
    finally:
        await runtime.close()


async def test_the_process_runtime_unpacks_the_module_with_whiteouts(
    registry: RegistryServer, tmp_path: Path
) -> None:
    name = repo()
    first = layer({"module/module.json": MODULE_JSON, "module/old.txt": b"gone", "etc/passwd": b"x"})
    second = layer({"module/old.txt": None, "module/models/m/1/model.onnx": b"weights"})
    pushed = push_image(registry.address, name, "1", [first, second])
    runtime = ProcessRuntime(
        tmp_path / "state",
        tmp_path / "images",
        puller=RegistryPuller(BlobStore(tmp_path / "blobs")),
        pulls=PullTracker(),
    )
    try:
        await runtime.pull(Pull(module="m", image=pushed.reference, reason="test"))
        await runtime.pulls.wait(pushed.reference)
        _, images = await runtime.observe([pushed.reference])
        assert images.is_present(pushed.reference), dict(images.failed)
        folder = image_dir(tmp_path / "images", pushed.reference)
        assert (folder / "module.json").read_bytes() == MODULE_JSON
        assert (folder / "models/m/1/model.onnx").read_bytes() == b"weights"
        assert not (folder / "old.txt").exists()
        assert not (tmp_path / "images" / "etc").exists()  # only /module is unpacked
    finally:
        await runtime.close()


async def test_gc_frees_what_it_should_and_nothing_else(
    registry: RegistryServer, docker_client: Any, tmp_path: Path, loaded_images: list[str]
) -> None:
    name = repo()
    shared = base_layer(20_000)
    refs = {}
    for tag in ("desired", "good", "old", "busy"):
        pushed = push_image(registry.address, name, tag, [shared, model_layer(10_000)])
        refs[tag] = pushed
        loaded_images.append(pushed.reference)
    foreign = push_image(registry.address, name, "foreign", [shared, model_layer(10_000)])
    loaded_images.append(foreign.reference)
    store = BlobStore(tmp_path / "blobs")
    book = ImageBook(tmp_path / "images.json")
    puller = RegistryPuller(store)
    runtime = DockerRuntime(
        docker_client, profiles={}, device_id="d13gc", puller=puller, images=book, gc_grace=timedelta(0)
    )
    busy_container = None
    try:
        for pushed in refs.values():
            await runtime.pull(Pull(module="m", image=pushed.reference, reason="test"))
            await runtime.pulls.wait(pushed.reference)
        # Loaded by someone else (not through this agent): never the agent's to remove.
        other = RegistryPuller(BlobStore(tmp_path / "other-blobs"))
        DockerRuntime(docker_client, profiles={}, puller=other)._load_blocking(
            await other.pull(foreign.reference)
        )
        # A container nobody labelled uses "busy": Docker refuses to remove it, so it stays.
        busy_container = docker_client.containers.create(
            refs["busy"].reference, name=f"gc-busy-{uuid.uuid4().hex[:8]}"
        )
        keep = {refs["desired"].reference, refs["good"].reference}
        now = datetime.now(timezone.utc)
        assert await runtime.collect_images(keep, now) == []  # first seen unneeded: marked only
        removed = await runtime.collect_images(keep, now + timedelta(seconds=1))
        assert removed == [refs["old"].reference]
        present = {t for image in docker_client.images.list() for t in image.tags}
        for tag in ("desired", "good", "busy"):
            assert refs[tag].reference in present, tag
        assert foreign.reference in present
        assert refs["old"].reference not in present
        assert set(book.load()) == {refs["desired"].reference, refs["good"].reference, refs["busy"].reference}
        assert not store.has(refs["old"].layers[1].digest)  # its own model layer is gone
        assert store.has(shared.digest)  # the layer other images share stays
        assert store.has(refs["desired"].layers[1].digest)
    finally:
        if busy_container is not None:
            busy_container.remove(force=True)
        await runtime.close()


async def test_disk_low_fails_the_pull_before_any_layer_is_fetched(
    registry: RegistryServer, store: BlobStore
) -> None:
    pushed = push_image(registry.address, repo(), "1", [base_layer(10_000)])
    puller = RegistryPuller(store, min_free_bytes=1 << 62)
    with pytest.raises(
        PullError, match=r"disk low: .* needs 0\.0\d* MB more, .* MB are free in .*pull\.min_free_mb"
    ):
        await puller.pull(pushed.reference)
    assert puller.bytes_received == len(pushed.manifest) + len(pushed.config)  # the config says which layers
    assert store.digests() == {sha256_digest(pushed.config)}


class _TokenRegistry(RegistryServer):
    """The same registry storage, served with Docker token auth (``auth: token``)."""

    def __init__(self, workdir: Path, realm: str, bundle: Path) -> None:
        super().__init__(workdir)
        self.config_path.write_text(
            self.config_path.read_text()
            + f"auth:\n  token:\n    realm: {realm}\n    service: {SERVICE}\n    issuer: {ISSUER}\n"
            f"    rootcertbundle: {bundle}\n"
        )

    def ready(self) -> bool:
        return http_status(f"{self.url}/v2/") == 401


async def test_token_auth_registry(request: pytest.FixtureRequest, tmp_path: Path, store: BlobStore) -> None:
    workdir = tmp_path / "registry"
    workdir.mkdir()
    plain = start_or_skip(request.config, "registry", lambda: _started(RegistryServer(workdir)))
    name = repo()
    try:
        pushed = push_image(plain.address, name, "1", [base_layer(5000), model_layer(3000)])
    finally:
        plain.stop()
    issuer = TokenIssuer({"puller": "s3cret"})
    runner, realm = await serve_tokens(issuer)
    secured = _TokenRegistry(workdir, realm, issuer.write_bundle(tmp_path / "token.pem"))
    try:
        await asyncio.to_thread(secured.start)
        ref = f"{secured.address}/{name}:1"
        puller = RegistryPuller(store)
        with pytest.raises(PullError, match=r"token from .* refused"):
            await puller.pull(ref, auth=("puller", "wrong"))
        pulled = await puller.pull(ref, auth=("puller", "s3cret"))
        assert pulled.manifest_digest == pushed.manifest_digest
        assert issuer.issued and all(scope == f"repository:{name}:pull" for scope in issuer.issued)
        assert len(issuer.issued) == 1, "one token serves the manifest and every blob"
    finally:
        secured.stop()
        await runner.cleanup()


async def test_after_an_engine_pull_a_model_only_update_fetches_only_the_model(
    registry: RegistryServer, docker_client: Any, tmp_path: Path, loaded_images: list[str]
) -> None:
    name = repo()
    base = base_layer(150_000)
    old = push_image(registry.address, name, "1", [base, model_layer()])
    new = push_image(registry.address, name, "2", [base, model_layer(40_000)])
    loaded_images += [old.reference, new.reference]
    docker_client.images.pull(f"{registry.address}/{name}", tag="1")  # Docker Engine's own pull
    puller = RegistryPuller(BlobStore(tmp_path / "blobs"))  # an empty store: nothing from that pull
    runtime = DockerRuntime(docker_client, profiles={}, device_id="d13m", puller=puller)
    try:
        await runtime.pull(Pull(module="m", image=new.reference, reason="test"))
        await runtime.pulls.wait(new.reference)
        _, images = await runtime.observe([new.reference])
        assert images.is_present(new.reference), dict(images.failed)
    finally:
        await runtime.close()
    assert puller.bytes_received == len(new.manifest) + len(new.config) + len(new.layers[1].blob)
    assert docker_client.images.get(new.reference).attrs["RootFS"]["Layers"] == [
        x.diff_id for x in new.layers
    ]


async def test_process_runtime_gc_removes_unneeded_module_dirs_and_their_blobs(
    registry: RegistryServer, tmp_path: Path
) -> None:
    name = repo()
    shared = layer({"module/module.json": MODULE_JSON})
    kept = push_image(registry.address, name, "kept", [shared, model_layer(2000)])
    old = push_image(registry.address, name, "old", [shared, model_layer(2000)])
    store = BlobStore(tmp_path / "blobs")
    runtime = ProcessRuntime(
        tmp_path / "state",
        tmp_path / "images",
        puller=RegistryPuller(store),
        images=ImageBook(tmp_path / "images.json"),
        gc_grace=timedelta(hours=1),
    )
    unrelated = image_dir(tmp_path / "images", f"{registry.address}/{name}:provisioned")
    unrelated.mkdir(parents=True)
    (unrelated / "module.json").write_bytes(MODULE_JSON)  # unpacked by whoever provisioned the device
    try:
        for pushed in (kept, old):
            await runtime.pull(Pull(module="m", image=pushed.reference, reason="test"))
            await runtime.pulls.wait(pushed.reference)
        now = datetime.now(timezone.utc)
        keep = [kept.reference]
        assert await runtime.collect_images(keep, now) == []
        assert await runtime.collect_images(keep, now + timedelta(minutes=59)) == []  # within the grace
        release = asyncio.Event()

        async def downloading() -> None:
            await release.wait()

        runtime.pulls.start("elsewhere/busy:1", downloading)
        # While a download runs nothing is collected: its blobs are not in the book yet.
        assert await runtime.collect_images(keep, now + timedelta(hours=2)) == []
        release.set()
        await runtime.pulls.wait("elsewhere/busy:1")
        assert await runtime.collect_images(keep, now + timedelta(hours=1)) == [old.reference]
    finally:
        await runtime.close()
    assert not image_dir(tmp_path / "images", old.reference).exists()
    assert (image_dir(tmp_path / "images", kept.reference) / "module.json").is_file()
    assert (unrelated / "module.json").is_file()
    assert (
        not store.has(old.layers[1].digest) and store.has(shared.digest) and store.has(kept.layers[1].digest)
    )
