"""Packaging benchmark: image size, packaging time, bytes moved by a model-only update, reproducibility.

A CNCF registry (``docker-registry``) is started on a free loopback port and Docker Engine must be
running. The cpu base image is built first when this machine has none (minutes, once; reported
separately). The digits example (8x8, scikit-learn's bundled digits) is registered as ``digits``
version 1 and its 28x28 variant as version 2 in a model registry in a temp data dir, then:

- **image size**: the packaged cpu module image (``docker images`` size, uncompressed) against the
  1.43 GB image Azure ML's ``Model.package`` shows in its documentation;
- **package, base cached**: ``package`` of version 1 end to end (layers, load, smoke check, push);
- **re-package**: the same inputs again: the digest must be the same;
- **model-only update**: version 2 on the same base: bytes pushed against the model file's size.

    python3 -m bench.packaging [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from bench._servers import free_port
from bench._table import table
from cloud.config import resolve_settings
from cloud.inference_config import InferenceConfig
from cloud.packaging import engine
from cloud.packaging.base import ensure_base_image, inputs_hash, repository_path
from cloud.packaging.models import models_from_registry
from cloud.packaging.package import PackageRequest, package
from cloud.packaging.progress import Silent
from cloud.store import Registry
from modules.examples.digits import build_digits_onnx
from modules.profiles import get_profile

AZURE_ML_IMAGE_BYTES = 1.43e9
SIZE_TARGET_BYTES = 250e6
PACKAGE_TARGET_S = 15.0
UPDATE_TARGET_RATIO = 1.05


@dataclass(frozen=True)
class PackagingFigures:
    """What one benchmark run measured."""

    base_ref: str
    base_seconds: float
    base_was_cached: bool
    image_bytes: int
    base_image_bytes: int
    package_seconds: float
    repackage_seconds: float
    digest_first: str
    digest_again: str
    update_bytes_pushed: int
    update_model_bytes: int
    update_layers_uploaded: int


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


@contextmanager
def docker_registry(root: Path) -> Iterator[str]:
    """A CNCF registry on 127.0.0.1 with storage under ``root``; yields ``host:port``."""
    binary = shutil.which("docker-registry")
    if binary is None:
        raise SystemExit("docker-registry is not installed (apt-get install docker-registry)")
    address = f"127.0.0.1:{free_port()}"
    config = root / "registry.yml"
    config.write_text(
        f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root / 'storage'}\n"
        f"http:\n  addr: {address}\n"
    )
    with open(root / "registry.log", "wb") as out:
        proc = subprocess.Popen([binary, "serve", str(config)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://{address}/v2/", timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"docker-registry did not start: {(root / 'registry.log').read_text()[-500:]}"
                    ) from None
                time.sleep(0.2)
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _sample(folder: Path) -> object:
    return json.loads((folder / "sample.json").read_text())


def run(root: Path, registry: str) -> PackagingFigures:
    client = engine.connect()
    started = time.monotonic()
    progress = _Counting()
    base_ref = ensure_base_image("cpu", registry, client=client, progress=progress)
    base_seconds = time.monotonic() - started
    log(f"base {base_ref} in {base_seconds:.1f} s ({'cached' if progress.cached else 'built'})")

    store = Registry.open(resolve_settings(root / "data"))
    try:
        small = root / "digits8"
        large = root / "digits28"
        build_digits_onnx(small)
        build_digits_onnx(large, image_size=28)
        store.register(small / "model.onnx", "digits")
        store.register(large / "model.onnx", "digits")

        def request(version: int, folder: Path) -> PackageRequest:
            return PackageRequest(
                models=models_from_registry(store, [f"digits:{version}"]),
                config=InferenceConfig(input_sample=_sample(folder)),
                profiles=["cpu"],
                registry=registry,
                repository=f"bench-digits-{os.getpid()}",
            )

        started = time.monotonic()
        [first] = package(request(1, small), client=client, progress=Silent())
        package_seconds = time.monotonic() - started
        log(f"packaged {first.ref} in {package_seconds:.1f} s")
        started = time.monotonic()
        [again] = package(request(1, small), client=client, progress=Silent())
        repackage_seconds = time.monotonic() - started
        [update] = package(request(2, large), client=client, progress=Silent())
        log(f"model-only update {update.ref}: {update.bytes_pushed} bytes pushed")
    finally:
        store.close()
    assert first.ref and again.ref and update.push and first.local_tag
    image_bytes = int(client.images.get(first.local_tag).attrs["Size"])
    profile = get_profile("cpu")
    base_local = f"{repository_path(profile.base.image)}:{inputs_hash(profile)[:16]}"
    base_bytes = int(client.images.get(base_local).attrs["Size"])
    for ref in (first.local_tag, update.local_tag):
        if ref:
            engine.remove_tag(client, ref)
    return PackagingFigures(
        base_ref=base_ref,
        base_seconds=base_seconds,
        base_was_cached=progress.cached,
        image_bytes=image_bytes,
        base_image_bytes=base_bytes,
        package_seconds=package_seconds,
        repackage_seconds=repackage_seconds,
        digest_first=first.ref.split("@")[1],
        digest_again=again.ref.split("@")[1],
        update_bytes_pushed=update.bytes_pushed,
        update_model_bytes=(large / "model.onnx").stat().st_size,
        update_layers_uploaded=len(update.push.uploaded) - 1,
    )


class _Counting(Silent):
    """Notices whether the base came from the cache."""

    cached = False

    def step(self, message: str) -> None:
        if "cached as" in message:
            self.cached = True


def render(f: PackagingFigures) -> str:
    ratio = f.update_bytes_pushed / f.update_model_bytes
    same = f.digest_first == f.digest_again
    rows = [
        ("measure", "measured", "reference / target", "met"),
        (
            "cpu module image size (uncompressed)",
            f"{f.image_bytes / 1e6:.0f} MB (base {f.base_image_bytes / 1e6:.0f} MB)",
            f"Azure ML package 1430 MB / ≤ {SIZE_TARGET_BYTES / 1e6:.0f} MB",
            "yes" if f.image_bytes <= SIZE_TARGET_BYTES else "NO",
        ),
        (
            "package a model, base cached",
            f"{f.package_seconds:.1f} s",
            f"≤ {PACKAGE_TARGET_S:.0f} s",
            "yes" if f.package_seconds <= PACKAGE_TARGET_S else "NO",
        ),
        (
            "re-package the same inputs",
            f"{f.repackage_seconds:.1f} s, digest {'same' if same else 'DIFFERENT'}",
            "same digest",
            "yes" if same else "NO",
        ),
        (
            "model-only update: bytes pushed",
            f"{f.update_bytes_pushed:,} B = {ratio:.3f}x the {f.update_model_bytes:,} B model "
            f"({f.update_layers_uploaded} layer)",
            f"≤ {UPDATE_TARGET_RATIO:.2f}x",
            "yes" if ratio <= UPDATE_TARGET_RATIO else "NO",
        ),
        (
            "base image (cpu)",
            f"{'cached' if f.base_was_cached else 'built'} in {f.base_seconds:.1f} s",
            "-",
            "-",
        ),
    ]
    return table(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m bench.packaging", description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edge-packaging-bench-") as tmp:
        root = Path(tmp)
        with docker_registry(root) as registry:
            log(f"registry on {registry}; {os.cpu_count()} CPUs, Python {platform.python_version()}")
            figures = run(root, registry)
    if args.json:
        print(json.dumps(asdict(figures), indent=2))
    else:
        load = "/".join(f"{x:.1f}" for x in os.getloadavg())
        python = platform.python_version()
        print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {load}, Python {python}")
        print(render(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
