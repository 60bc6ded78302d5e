"""Base images per device profile, for sites without a public container registry.

``source: debootstrap`` profiles get a base built here: Debian bookworm (minbase) with python3 and
the profile's apt packages, the profile's and the scoring runtime's Python deps resolved on this
host, archived as one reproducible layer, loaded into Docker Engine and pushed to the registry.
A base is named by a hash of its inputs (``inputs_hash``) and reused while that hash matches: in
Docker Engine as ``<repository>:<hash[:16]>`` and in the registry under the same tag.

``source: vendor`` profiles (CUDA, OpenVINO for MYRIAD, Vitis AI) name the vendor's image; it is
used when Docker Engine or the registry has it, and otherwise packaging stops with a message
saying where to get it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker

from cloud.packaging import engine
from cloud.packaging.cache import BuildCache
from cloud.packaging.debootstrap import SUITE, build_rootfs, site_packages, unmount_below
from cloud.packaging.errors import BaseImageUnavailable, InputError, PackagingError, RegistryError, os_error
from cloud.packaging.image import (
    BlobRef,
    ImageDocuments,
    RuntimeSettings,
    build_documents,
    manifest_for,
    source_date_epoch,
    write_load_archive,
)
from cloud.packaging.layers import Layer, rootfs_layer
from cloud.packaging.progress import LinePrinter, Progress, human_bytes
from cloud.packaging.push import push_image
from cloud.packaging.pydeps import profile_requirements
from cloud.packaging.registry_client import Credentials, RegistryClient
from modules.contract import DeviceProfile, registry_of, split_image_ref

BUILDER_VERSION = "1"
"""Bump when the base image recipe changes: every base is rebuilt."""

LABEL_INPUTS = "io.edgedeploy.base.inputs"
LABEL_PYTHON = "io.edgedeploy.base.python"
LABEL_PROFILE = "io.edgedeploy.base.profile"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_SPACE_FOR_BUILD = 2_000_000_000


@dataclass(frozen=True)
class BaseImage:
    """A profile's base image as packaging uses it."""

    profile: str
    source: str
    repository: str
    """Repository path in the registry (without the registry address)."""
    local_ref: str
    """The name Docker Engine knows it by."""
    docs: ImageDocuments
    blobs: dict[str, Path] = field(default_factory=dict)
    """Layer digest → cached blob file, for the layers that are cached locally."""
    python: dict[str, str] = field(default_factory=dict)
    """Python distributions the base holds (debootstrap bases), ``{name: version}``."""
    registry_ref: str | None = None
    """``registry/repository@sha256:…`` once pushed."""
    python_version: str = "3.11"

    @property
    def config(self) -> dict[str, Any]:
        """The base's image config."""
        return dict(json.loads(self.docs.config))

    @property
    def site_packages(self) -> str:
        """Where the base keeps Python packages (for extra deps layered on top)."""
        return site_packages(self.python_version)


def repository_path(image: str) -> str:
    """A reference's repository path without its registry: ``nvcr.io/nvidia/cuda:12`` → ``nvidia/cuda``."""
    repo = split_image_ref(image).repository
    first, _, rest = repo.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return rest
    return repo


def _tag_of(image: str) -> str:
    return split_image_ref(image).tag or "latest"


def base_inputs(profile: DeviceProfile) -> dict[str, Any]:
    """Everything that determines a debootstrap base image."""
    return {
        "builder": BUILDER_VERSION,
        "suite": SUITE,
        "variant": "minbase",
        "base": profile.base.model_dump(mode="json"),
        "requirements": profile_requirements(profile),
        "platform": "linux/amd64",
    }


def inputs_hash(profile: DeviceProfile) -> str:
    """sha256 (hex) of ``base_inputs``: the cache key of a profile's base image."""
    raw = json.dumps(base_inputs(profile), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()


def _python_label(versions: dict[str, str]) -> str:
    return " ".join(f"{n}=={v}" for n, v in sorted(versions.items()))


def _parse_python_label(config: dict[str, Any]) -> dict[str, str]:
    raw = ((config.get("config") or {}).get("Labels") or {}).get(LABEL_PYTHON, "")
    return dict(item.split("==", 1) for item in raw.split() if "==" in item)


# ---------------------------------------------------------------------------------------------------


def resolve_base(
    profile: DeviceProfile,
    registry: RegistryClient | None,
    client: docker.DockerClient,
    cache: BuildCache,
    progress: Progress,
    *,
    rebuild: bool = False,
    pull_auth: Mapping[str, tuple[str, str]] | None = None,
) -> BaseImage:
    """The profile's base image, present in Docker Engine and (when ``registry``) pushed there.

    ``pull_auth`` (registry host → ``(username, password)``): a vendor base image found neither
    here nor in ``registry`` is pulled from its own registry with these credentials.
    """
    if profile.base.source == "vendor":
        return _vendor_base(profile, registry, client, cache, progress, pull_auth or {})
    key = inputs_hash(profile)
    tag = key[:16]
    repo = repository_path(profile.base.image)
    local_ref = f"{repo}:{tag}"
    docs = None if rebuild else _cached_documents(key, local_ref, registry, repo, client, cache, progress)
    if docs is None:
        docs = _build_debootstrap(profile, key, local_ref, client, cache, progress)
    else:
        progress.step(f"base image for profile {profile.name}: cached as {local_ref} (inputs {tag})")
    base = BaseImage(
        profile=profile.name,
        source="debootstrap",
        repository=repo,
        local_ref=local_ref,
        docs=docs,
        blobs=cache.known_blobs([layer.digest for layer in docs.layers()]),
        python=_parse_python_label(json.loads(docs.config)),
        python_version=profile.base.python,
    )
    if registry is None:
        return base
    return _publish_base(base, registry, client, cache, progress, [tag, _tag_of(profile.base.image)])


def _cached_documents(
    key: str,
    local_ref: str,
    registry: RegistryClient | None,
    repo: str,
    client: docker.DockerClient,
    cache: BuildCache,
    progress: Progress,
) -> ImageDocuments | None:
    """The base's documents when it was built before (cache, Docker Engine or registry), else None."""
    docs = cache.load_documents(key)
    local = engine.find_image(client, local_ref)
    if local is not None and (local.labels or {}).get(LABEL_INPUTS) != key:
        local = None
    if docs is not None and local is not None and local.id == docs.config_digest:
        return docs
    if local is not None:
        progress.step(f"recovering the layers of {local_ref} from Docker Engine")
        return _export_documents(client, local_ref, key, cache, progress)
    if registry is None:
        return None
    found = registry.get_manifest(repo, key[:16])
    if found is None:
        return None
    manifest = found[0]
    config_digest = json.loads(manifest)["config"]["digest"]
    config = registry.get_blob(repo, config_digest)
    if json.loads(config).get("config", {}).get("Labels", {}).get(LABEL_INPUTS) != key:
        return None
    docs = ImageDocuments(config=config, manifest=manifest)
    progress.step(f"base image {repo}:{key[:16]} found in {registry.address}: pulling it into Docker Engine")
    engine.pull(client, f"{registry.address}/{repo}@{docs.manifest_digest}", progress)
    engine.tag(client, docs.config_digest, local_ref)
    cache.store_documents(key, docs)
    return docs


def _export_blobs(
    client: docker.DockerClient, ref: str, cache: BuildCache, progress: Progress
) -> tuple[bytes, list[Layer]]:
    """Export ``ref`` from Docker Engine, keeping its layers as cached blobs; its config and layers."""
    config, layers = engine.export_image(client, ref, cache.root / "blobs" / "sha256", progress)
    for layer in layers:
        cache.keep_blob(layer)
    return config, layers


def _export_documents(
    client: docker.DockerClient, ref: str, key: str, cache: BuildCache, progress: Progress
) -> ImageDocuments:
    """Export ``ref`` from Docker Engine into the cache: its layers as blobs, its documents under ``key``."""
    config, layers = _export_blobs(client, ref, cache, progress)
    manifest = manifest_for(config, [BlobRef(layer.digest, layer.size, layer.diff_id) for layer in layers])
    docs = ImageDocuments(config=config, manifest=manifest)
    cache.store_documents(key, docs)
    return docs


def _build_debootstrap(
    profile: DeviceProfile,
    key: str,
    local_ref: str,
    client: docker.DockerClient,
    cache: BuildCache,
    progress: Progress,
) -> ImageDocuments:
    """Build the base from Debian and PyPI, load it into Docker Engine; returns its documents."""
    cache.require_space(_SPACE_FOR_BUILD, f"building the {profile.name} base image")
    requirements = profile_requirements(profile)
    progress.step(
        f"building the base image for profile {profile.name} (inputs {key[:16]}); this takes minutes"
    )
    with cache.workdir(f"base-{profile.name}-") as work:
        root = work / "rootfs"
        try:
            python = build_rootfs(
                root,
                profile.base.apt_packages,
                requirements,
                progress,
                work / "build.log",
                cache.root / "debs",
            )
            progress.step("archiving the root file system as one layer")
            layer = rootfs_layer(root, work / "layer.tar.gz", empty_dirs=("dev", "proc", "sys"))
        except OSError as exc:
            raise os_error(exc, f"building the {profile.name} base image in {work}") from None
        finally:
            unmount_below(root)
        progress.step(f"base layer: {human_bytes(layer.size)} compressed ({layer.digest[:19]})")
        blob = cache.keep_blob(layer)
        settings = RuntimeSettings(
            env={"PATH": BASE_PATH, "LANG": "C.UTF-8"},
            cmd=["python3"],
            labels={
                LABEL_INPUTS: key,
                LABEL_PROFILE: profile.name,
                LABEL_PYTHON: _python_label(python),
                "org.opencontainers.image.description": f"edgedeploy base for profile {profile.name}: "
                f"Debian {SUITE} minbase, python3, {', '.join(requirements)}",
            },
        )
        apt = " ".join(["python3", *profile.base.apt_packages])
        history = f"debootstrap --variant=minbase {SUITE} {apt}; pip install {' '.join(requirements)}"
        docs = build_documents(
            [BlobRef(layer.digest, layer.size, layer.diff_id)],
            settings,
            source_date_epoch(),
            [history.strip()],
        )
        archive = work / "load.tar"
        write_load_archive(archive, docs, {layer.digest: blob}, [local_ref, profile.base.image])
        progress.step(f"loading {local_ref} into Docker Engine")
        engine.load_archive(client, archive, progress)
    cache.store_documents(key, docs)
    return docs


def _publish_base(
    base: BaseImage,
    registry: RegistryClient,
    client: docker.DockerClient,
    cache: BuildCache,
    progress: Progress,
    tags: list[str],
) -> BaseImage:
    """Push the base to the registry unless it is there already; returns it with its registry ref."""
    ref = f"{registry.address}/{base.repository}@{base.docs.manifest_digest}"
    found = registry.get_manifest(base.repository, tags[0])
    blobs = base.blobs
    if found is None or found[0] != base.docs.manifest:
        if any(layer.digest not in blobs for layer in base.docs.layers()):
            _export_blobs(client, base.local_ref, cache, progress)
            blobs = cache.known_blobs([layer.digest for layer in base.docs.layers()])
        progress.step(f"pushing base image {base.local_ref} to {registry.address}/{base.repository}")
        push_image(registry, base.repository, base.docs, blobs, tags, progress)
    return BaseImage(**{**base.__dict__, "blobs": blobs, "registry_ref": ref})


def _vendor_base(
    profile: DeviceProfile,
    registry: RegistryClient | None,
    client: docker.DockerClient,
    cache: BuildCache,
    progress: Progress,
    pull_auth: Mapping[str, tuple[str, str]],
) -> BaseImage:
    """A vendor base image from Docker Engine, the registry or (with a credential) its own registry,
    or a clear error saying where to get it."""
    image = profile.base.image
    repo = repository_path(image)
    local = engine.find_image(client, image)
    auth = pull_auth.get(registry_of(image))
    if local is None and auth is not None:
        progress.step(f"pulling base image {image} with the stored credential for {registry_of(image)}")
        engine.pull(client, image, progress, auth)
        local = engine.find_image(client, image)
    if local is None and registry is not None:
        mirrored = f"{registry.address}/{repo}:{_tag_of(image)}"
        try:
            present = registry.get_manifest(repo, _tag_of(image)) is not None
        except RegistryError:
            present = False
        if present:
            engine.pull(client, mirrored, progress)
            local = engine.find_image(client, mirrored)
    if local is None:
        note = (profile.base.vendor_note or "").split(". ")[0].strip().rstrip(".")
        raise BaseImageUnavailable(
            f"profile {profile.name}: base image {image} is not available here and cannot be built from "
            f"Debian ({note}; see base.vendor_note in the profile); load it with 'docker load' or push it "
            f"to the registry as {repo}, or write a build context with --dockerfile and build it where "
            "the image exists"
        )
    key = "vendor-" + local.id.removeprefix("sha256:")
    docs = cache.load_documents(key)
    if docs is None or not cache.known_blobs([layer.digest for layer in docs.layers()]):
        docs = _export_documents(client, local.id, key, cache, progress)
    return BaseImage(
        profile=profile.name,
        source="vendor",
        repository=repo,
        local_ref=local.id,
        docs=docs,
        blobs=cache.known_blobs([layer.digest for layer in docs.layers()]),
        python_version=profile.base.python,
    )


def ensure_base_image(
    profile: DeviceProfile | str,
    registry: str | None,
    *,
    cache_dir: Path | None = None,
    client: docker.DockerClient | None = None,
    credentials: Credentials | None = None,
    progress: Progress | None = None,
    rebuild: bool = False,
) -> str:
    """Make sure ``profile``'s base image exists (built, loaded, pushed); return its image reference.

    With a ``registry`` (``host:port``) the result is pinned, ``registry/repo@sha256:…``; without
    one it is the local name. Cached by ``inputs_hash``: a second call returns at once. Usable
    from test fixtures.
    """
    from modules.profiles import ProfileError, get_profile

    try:
        prof = get_profile(profile) if isinstance(profile, str) else profile
    except ProfileError as exc:
        raise InputError(str(exc).splitlines()[0]) from None
    reg = RegistryClient(registry, credentials) if registry else None
    if reg is not None:
        reg.ping()
    try:
        base = resolve_base(
            prof,
            reg,
            engine.connect(client),
            BuildCache(cache_dir),
            progress or LinePrinter(),
            rebuild=rebuild,
        )
    except OSError as exc:
        raise os_error(exc, f"preparing the base image of profile {prof.name}") from None
    if base.registry_ref is None and registry and base.source == "debootstrap":
        raise PackagingError(f"base image for profile {prof.name} was not pushed to {registry}")
    return base.registry_ref or base.local_ref
