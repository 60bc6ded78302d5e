"""``edgectl package``, ``edgectl base build`` and ``edgectl model profile``.

``register(groups)`` adds ``package`` and ``base`` to edgectl's top-level subparsers;
``register_model_profile(model_commands)`` adds ``profile`` to the ``model`` group's subparsers.
Progress goes to stderr, results (image references by digest) to stdout.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cloud.commands.base import (
    EXIT_FAILURE,
    EXIT_USAGE,
    CliError,
    add_command,
    print_json,
    settings_from,
    store_errors,
)
from cloud.fleet.credentials import pull_auth
from cloud.inference_config import InferenceConfig, InferenceConfigError, load_inference_config
from cloud.keys import KeyFileError, load_or_create_signing_key
from cloud.packaging.base import ensure_base_image
from cloud.packaging.errors import InputError, PackagingError, SmokeTestError
from cloud.packaging.models import models_from_registry
from cloud.packaging.package import DEFAULT_REGISTRY, PackageRequest, package
from cloud.packaging.profiling import profile_image
from cloud.packaging.progress import LinePrinter, human_bytes
from cloud.store import Registry

Subparsers = argparse._SubParsersAction


def print_log_tail(tail: str | None) -> None:
    """The last lines of a module's log that a smoke test kept, framed, on stderr."""
    if tail:
        print("---- module log (last lines) ----", file=sys.stderr)
        print(tail, file=sys.stderr)
        print("---------------------------------", file=sys.stderr)


@contextmanager
def packaging_errors() -> Iterator[None]:
    """Turn packaging errors into one-line CliErrors (bad input exits 2, failures 1)."""
    try:
        yield
    except SmokeTestError as e:
        print_log_tail(e.log_tail)
        raise CliError(str(e), EXIT_FAILURE) from e
    except InputError as e:
        raise CliError(str(e), EXIT_USAGE) from e
    except PackagingError as e:
        raise CliError(str(e), EXIT_FAILURE) from e


def _profiles(values: list[str]) -> list[str]:
    names = [p.strip() for value in values for p in value.split(",") if p.strip()]
    if not names:
        raise CliError("give at least one --profile")
    return names


def _config(path: str | None) -> InferenceConfig:
    if path is None:
        return InferenceConfig()
    try:
        return load_inference_config(Path(path))
    except InferenceConfigError as e:
        raise CliError(str(e), EXIT_USAGE) from e


def cmd_package(args: argparse.Namespace) -> int:
    """Package registered models into module images (or build contexts), one per profile."""
    config = _config(args.config)
    settings = settings_from(args)
    try:
        signing_key = load_or_create_signing_key(settings.data_dir)
    except KeyFileError as e:
        raise CliError(str(e), EXIT_FAILURE) from e
    with store_errors():
        registry = Registry.open(settings)
        try:
            models = models_from_registry(registry, args.model)
            with registry.db.transaction() as s:
                auth = pull_auth(s, signing_key)
            request = PackageRequest(
                models=models,
                config=config,
                profiles=_profiles(args.profile),
                name=args.name,
                version=args.module_version,
                registry=args.registry,
                repository=args.repository,
                dockerfile_dir=Path(args.dockerfile) if args.dockerfile else None,
                smoke=not args.no_smoke,
                push=not args.no_push,
                pull_auth=auth,
            )
            with packaging_errors():
                results = package(request, cache_dir=_cache_dir(args), progress=LinePrinter(sys.stderr))
        finally:
            registry.close()
    if args.json:
        print_json(
            [
                {
                    "profile": r.profile,
                    "module": r.module,
                    "version": r.version,
                    "image": r.ref,
                    "local_tag": r.local_tag,
                    "image_id": r.image_id,
                    "bytes_pushed": r.bytes_pushed,
                    "layers": [{"name": n, "size": s, "digest": d} for n, s, d in r.layers],
                    "dockerfile": str(r.dockerfile) if r.dockerfile else None,
                }
                for r in results
            ]
        )
        return 0
    for r in results:
        if r.dockerfile is not None:
            print(f"{r.module} {r.version} ({r.profile}): build context {r.dockerfile.parent}")
        elif r.ref is not None:
            print(f"{r.module} {r.version} ({r.profile}): {r.ref} ({human_bytes(r.bytes_pushed)} pushed)")
        else:
            print(f"{r.module} {r.version} ({r.profile}): {r.local_tag} (not pushed)")
    return 0


def cmd_base_build(args: argparse.Namespace) -> int:
    """Build (or find cached) the base image of each profile and push it to the registry."""
    refs = []
    with packaging_errors():
        for name in _profiles(args.profile):
            ref = ensure_base_image(
                name,
                None if args.no_push else args.registry,
                cache_dir=_cache_dir(args),
                progress=LinePrinter(sys.stderr),
                rebuild=args.rebuild,
            )
            refs.append({"profile": name, "image": ref})
    if args.json:
        print_json(refs)
    else:
        for item in refs:
            print(f"{item['profile']}: {item['image']}")
    return 0


def cmd_model_profile(args: argparse.Namespace) -> int:
    """Run a module image locally against a sample; report latency and resources."""
    try:
        sample = Path(args.sample).read_bytes()
    except OSError as e:
        raise CliError(f"--sample {args.sample}: cannot read: {e.strerror or e}") from e
    with packaging_errors():
        report = profile_image(
            args.image,
            sample,
            requests=args.requests,
            concurrency=args.concurrency,
            progress=LinePrinter(sys.stderr),
        )
    if args.json:
        print_json({**report.__dict__})
        return 0
    print(f"image        {report.image}")
    print(f"requests     {report.requests} ({report.concurrency} at a time), {report.errors} failed")
    print(f"latency      p50 {report.p50_ms:.2f} ms, p90 {report.p90_ms:.2f} ms, p99 {report.p99_ms:.2f} ms")
    print(f"throughput   {report.throughput_rps:.1f} requests/s")
    print(f"cpu          {report.cpu_avg_cores:.2f} cores on average, {report.cpu_peak_cores:.2f} at peak")
    print(f"memory       {report.memory_peak_mb:.0f} MB at peak")
    print("recommended for the deployment manifest:")
    print("  " + report.manifest_snippet().replace("\n", "\n  ").rstrip())
    return 0


def _cache_dir(args: argparse.Namespace) -> Path | None:
    if args.cache_dir:
        return Path(args.cache_dir)
    return settings_from(args).data_dir / "packaging"


def _add_cache_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="packaging cache (default: <data dir>/packaging): base layers, deps",
    )


def register(groups: Subparsers) -> None:
    """Add ``package`` and ``base build`` to edgectl's top-level subparsers."""
    register_package(groups)
    register_base(groups)


def register_package(groups: Subparsers) -> None:
    """Add ``edgectl package``."""
    p = add_command(
        groups,
        "package",
        cmd_package,
        help="package registered models into module images, one per device profile",
        description="Build a module image per device profile from registered models and an inference "
        "config, check that it starts and serves, and push it to an OCI registry (only the layers the "
        "registry lacks). Prints each image by digest. With --dockerfile, writes build contexts instead.",
        examples="  edgectl package --model digits:3 --profile cpu\n"
        "  edgectl package --model digits --config inference.yaml --profile cpu,cuda \\\n"
        "      --registry 127.0.0.1:5000\n"
        "  edgectl package --model digits --profile openvino-myriad --dockerfile out/\n",
    )
    p.add_argument("--model", action="append", required=True, metavar="NAME[:VERSION]", help="repeatable")
    p.add_argument("--config", metavar="FILE", help="inference config YAML (optional for ONNX models)")
    p.add_argument("--profile", action="append", required=True, metavar="P[,P...]", help="device profile(s)")
    p.add_argument("--name", help="module name (default: the model's name)")
    p.add_argument("--module-version", metavar="V", help="module version (default: the model's version)")
    p.add_argument(
        "--registry",
        metavar="HOST:PORT",
        help=f"OCI registry (default: the config's, else {DEFAULT_REGISTRY})",
    )
    p.add_argument("--repository", help="repository in the registry (default: the module name)")
    p.add_argument("--dockerfile", metavar="OUT_DIR", help="write a docker build context instead of building")
    p.add_argument("--no-smoke", action="store_true", help="skip running the image before pushing it")
    p.add_argument("--no-push", action="store_true", help="build and check locally, push nothing")
    _add_cache_option(p)


def register_base(groups: Subparsers) -> None:
    """Add ``edgectl base build``."""
    group = groups.add_parser("base", help="base images per device profile (built without public registries)")
    commands = group.add_subparsers(dest="command", metavar="COMMAND")
    p = add_command(
        commands,
        "build",
        cmd_base_build,
        help="build a profile's base image (Debian + PyPI) and push it; cached by its inputs",
        description="Build the base image of each profile from Debian packages (debootstrap) and "
        "Python wheels resolved on this host, load it into Docker Engine and push it to the registry. "
        "A base whose inputs did not change is reused at once. Vendor profiles (CUDA, OpenVINO for "
        "MYRIAD, Vitis AI) need the vendor's image to be loaded or pushed first.",
        examples="  edgectl base build --profile cpu\n"
        "  edgectl base build --profile cpu,openvino-cpu --rebuild\n",
    )
    p.add_argument("--profile", action="append", required=True, metavar="P[,P...]")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, metavar="HOST:PORT")
    p.add_argument("--no-push", action="store_true", help="only build and load into Docker Engine")
    p.add_argument("--rebuild", action="store_true", help="rebuild even when a cached base matches")
    _add_cache_option(p)


def register_model_profile(model_commands: Subparsers) -> None:
    """Add ``edgectl model profile`` to the ``model`` group's subparsers."""
    p = add_command(
        model_commands,
        "profile",
        cmd_model_profile,
        help="measure a module image's latency and resources with a sample request",
        description="Run a module image locally, send the sample to /score, and report p50/p99 "
        "latency, throughput, peak memory and CPU, and the cpus/memory_mb to put in the "
        "deployment manifest.",
        examples="  edgectl model profile --image 127.0.0.1:5000/digits@sha256:... --sample sample.json\n",
    )
    p.add_argument("--image", required=True, metavar="REF")
    p.add_argument("--sample", required=True, metavar="FILE", help="JSON body for POST /score")
    p.add_argument("--requests", type=int, default=200, metavar="N")
    p.add_argument("--concurrency", type=int, default=1, metavar="C")
