"""``edgectl package``: registered models + inference config → one module image per device profile.

For each profile: resolve the base image, resolve extra Python deps on this host, plan the layers,
then either write a ``docker build`` context (``dockerfile_dir``) or assemble the image
reproducibly, load it into Docker Engine under a staging tag, smoke-check it, push it to the
registry (only the blobs the registry lacks) and tag it ``registry/repo:version-profile``.

Everything is checked before anything is built: profiles exist, model files exist, the entry
script parses and defines init()/run(), the registry answers. On failure the staging tag is
removed, so no tag points at an image that was not pushed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import docker
from pydantic import ValidationError

from cloud.inference_config import InferenceConfig, InferenceConfigError
from cloud.packaging import engine
from cloud.packaging.assemble import assemble
from cloud.packaging.base import LABEL_PYTHON, BaseImage, resolve_base
from cloud.packaging.cache import BuildCache
from cloud.packaging.context import ModelInput, make_plan, module_info, write_context
from cloud.packaging.entry_check import check_entry_script
from cloud.packaging.errors import InputError, os_error
from cloud.packaging.image import source_date_epoch, write_load_archive
from cloud.packaging.progress import LinePrinter, Progress, human_bytes
from cloud.packaging.push import PushResult, push_image
from cloud.packaging.pydeps import pip_install, profile_requirements, prune_present, requirements_key
from cloud.packaging.registry_client import Credentials, RegistryClient
from cloud.packaging.smoke import smoke_run
from modules.contract import DeviceProfile, ModuleInfo, format_validation_error

DEFAULT_REGISTRY = "127.0.0.1:5000"
STAGING_REPO = "edgedeploy-staging"


@dataclass(frozen=True)
class PackageRequest:
    """What to package: models, how to serve them, for which profiles, and where the images go."""

    models: Sequence[ModelInput]
    config: InferenceConfig
    profiles: Sequence[str]
    name: str | None = None
    """Module name; default: the (first) model's name."""
    version: str | None = None
    """Module version; default: the model's version for one model, else "1"."""
    registry: str | None = None
    """``host:port``; default: the inference config's registry, else 127.0.0.1:5000."""
    repository: str | None = None
    """Repository in the registry; default: the module name."""
    dockerfile_dir: Path | None = None
    """Write build contexts here instead of building (one sub-folder per profile when several)."""
    smoke: bool = True
    push: bool = True
    pull_auth: Mapping[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    """registry host → ``(username, password)`` for pulling a vendor ``base_image`` (never printed)."""


@dataclass
class PackagedImage:
    """The outcome for one profile."""

    profile: str
    module: str
    version: str
    local_tag: str | None = None
    ref: str | None = None
    """``registry/repository@sha256:…`` once pushed."""
    image_id: str | None = None
    bytes_pushed: int = 0
    layers: list[tuple[str, int, str]] = field(default_factory=list)
    """``(layer name, compressed size, digest)`` of the layers on top of the base."""
    dockerfile: Path | None = None
    push: PushResult | None = None
    seconds: float = 0.0


def _profile(name: str, profiles_dir: Path | None) -> DeviceProfile:
    from modules.profiles import ProfileError, get_profile

    try:
        return get_profile(name, profiles_dir)
    except ProfileError as exc:
        raise InputError(str(exc).splitlines()[0]) from None


def _profile_files(profile: DeviceProfile, profiles_dir: Path | None) -> list[Path]:
    """The profile's file and those of its fallbacks, for /module/profiles."""
    from modules.profiles import PROFILE_SUFFIXES, default_profiles_dir, fallback_chain, load_profiles

    folder = profiles_dir or default_profiles_dir()
    chain = fallback_chain(profile.name, load_profiles(folder))
    files = []
    for name in chain:
        found = next(
            (folder / f"{name}{s}" for s in PROFILE_SUFFIXES if (folder / f"{name}{s}").is_file()), None
        )
        if found is None:
            raise InputError(f"profile {name}: no file {name}.yaml in {folder}")
        files.append(found)
    return files


def check_request(request: PackageRequest, profiles_dir: Path | None = None) -> list[DeviceProfile]:
    """Every check that needs no building; returns the profiles. Raises InputError naming the problem."""
    if not request.models:
        raise InputError("no model given: pass --model NAME[:VERSION]")
    if not request.profiles:
        raise InputError("no device profile given: pass --profile cpu[,cuda,...]")
    for m in request.models:
        if not m.files:
            raise InputError(f"model {m.label} has no files")
        for rel, src in m.files:
            if not src.is_file():
                raise InputError(f"model {m.label}: file {rel} is missing (expected at {src})")
    labels = [m.name for m in request.models]
    if len(set(labels)) != len(labels):
        raise InputError(f"a model is given twice: {', '.join(labels)}")
    config = request.config
    missing = config.missing_files()
    if missing:
        raise InputError(f"inference config: {missing[0]}")
    try:
        config.check_entry_script([(m.name, m.framework) for m in request.models])
    except InferenceConfigError as exc:
        raise InputError(f"inference config: {exc}") from None
    if config.entry_script:
        check_entry_script(config.path(config.entry_script))
    return [_profile(name, profiles_dir) for name in dict.fromkeys(request.profiles)]


def _module_info(request: PackageRequest, profile: DeviceProfile) -> ModuleInfo:
    models = request.models
    name = request.name or models[0].name
    version = request.version or (str(models[0].version) if len(models) == 1 else "1")
    try:
        return module_info(name, version, profile.name, models, request.config)
    except ValidationError as exc:
        raise InputError(format_validation_error(exc, "module").splitlines()[0]) from None
    except InferenceConfigError as exc:
        raise InputError(f"inference config: {exc}") from None


def _with_base_override(profile: DeviceProfile, image: str | None) -> DeviceProfile:
    if image is None:
        return profile
    base = profile.base.model_copy(
        update={"image": image, "source": "vendor", "vendor_note": "base_image given in the inference config"}
    )
    return profile.model_copy(update={"base": base})


def python_deps(
    profile: DeviceProfile,
    present: dict[str, str],
    python_version: str,
    config: InferenceConfig,
    cache: BuildCache,
    progress: Progress,
) -> Path | None:
    """A site-packages folder with what the image needs beyond its base (None when nothing).

    ``present`` is what the base holds (``{name: version}``); a base that holds nothing known (a
    vendor image) gets the profile's and the scoring runtime's packages here too.
    """
    wanted = list(config.requirements)
    if not present:
        wanted = profile_requirements(profile) + wanted
    if not wanted:
        return None
    key = requirements_key(wanted, present, python_version)
    target = cache.pydeps_dir(key)
    if (target / ".complete").is_file():
        return target
    with cache.workdir("pydeps-") as work:
        site = work / "site"
        pip_install(wanted, site, progress, python=python_version, constraints=present or None)
        dropped = prune_present(site, present)
        if dropped:
            progress.step(f"  already in the base image: {', '.join(dropped)}")
        (site / ".complete").write_text(key)
        if target.exists():
            return target
        os.replace(site, target)
    return target


def _base_for(
    profile: DeviceProfile,
    registry: RegistryClient | None,
    client: docker.DockerClient,
    cache: BuildCache,
    progress: Progress,
    pull_auth: Mapping[str, tuple[str, str]],
) -> BaseImage:
    base = resolve_base(profile, registry, client, cache, progress, pull_auth=pull_auth)
    if base.source == "vendor" and not base.python:
        labels = (base.config.get("config") or {}).get("Labels") or {}
        if labels.get(LABEL_PYTHON):
            python = dict(item.split("==", 1) for item in labels[LABEL_PYTHON].split() if "==" in item)
            return BaseImage(**{**base.__dict__, "python": python})
    return base


def package(
    request: PackageRequest,
    *,
    client: docker.DockerClient | None = None,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
    profiles_dir: Path | None = None,
    credentials: Credentials | None = None,
) -> list[PackagedImage]:
    """Package ``request``: one image (or build context) per profile. See the module docstring."""
    out = progress or LinePrinter()
    profiles = check_request(request, profiles_dir)
    config = request.config
    address = request.registry or (config.registry.address if config.registry else DEFAULT_REGISTRY)
    if credentials is None and config.registry is not None and config.registry.address == address:
        try:
            resolved = config.credentials()
        except InferenceConfigError as exc:
            raise InputError(f"inference config: {exc}") from None
        if resolved is not None:
            credentials = Credentials(resolved.username, resolved.password.get_secret_value())
    writing_context = request.dockerfile_dir is not None
    registry: RegistryClient | None = None
    if request.push and (not writing_context or request.registry):
        registry = RegistryClient(address, credentials)
        registry.ping()
    cache = BuildCache(cache_dir)
    if not writing_context:
        raise_for_disk(cache, request)
    try:
        # Every base first, so that a missing vendor image stops the run before anything is pushed.
        bases = [_base_or_none(request, p, registry, client, cache, out) for p in profiles]
        results = []
        for profile, base in zip(profiles, bases, strict=True):
            results.append(_one_profile(request, profile, base, registry, client, cache, out, profiles_dir))
    except OSError as exc:
        raise os_error(exc, "packaging") from None
    return results


def _base_or_none(
    request: PackageRequest,
    profile: DeviceProfile,
    registry: RegistryClient | None,
    client: docker.DockerClient | None,
    cache: BuildCache,
    out: Progress,
) -> BaseImage | None:
    """The profile's base, or None when only a build context FROM a vendor image is written."""
    effective = _with_base_override(profile, request.config.base_image)
    if request.dockerfile_dir is not None and effective.base.source == "vendor":
        return None
    return _base_for(effective, registry, engine.connect(client), cache, out, request.pull_auth)


def _one_profile(
    request: PackageRequest,
    profile: DeviceProfile,
    base: BaseImage | None,
    registry: RegistryClient | None,
    client: docker.DockerClient | None,
    cache: BuildCache,
    out: Progress,
    profiles_dir: Path | None,
) -> PackagedImage:
    if base is None:
        # The vendor image need not be here: the context names it and carries every Python dep.
        effective = _with_base_override(profile, request.config.base_image)
        base_from, python = effective.base.image, effective.base.python
        return _write_context(request, profile, base_from, {}, python, cache, out, profiles_dir)
    if request.dockerfile_dir is not None:
        base_from = base.registry_ref or base.local_ref
        return _write_context(
            request, profile, base_from, base.python, base.python_version, cache, out, profiles_dir
        )
    return _build_and_push(request, profile, base, registry, engine.connect(client), cache, out, profiles_dir)


def _context_dir(request: PackageRequest, profile: DeviceProfile) -> Path:
    assert request.dockerfile_dir is not None
    several = len(dict.fromkeys(request.profiles)) > 1
    return request.dockerfile_dir / profile.name if several else request.dockerfile_dir


def _write_context(
    request: PackageRequest,
    profile: DeviceProfile,
    base_from: str,
    present: dict[str, str],
    python_version: str,
    cache: BuildCache,
    progress: Progress,
    profiles_dir: Path | None,
) -> PackagedImage:
    started = time.monotonic()
    info = _module_info(request, profile)
    deps = python_deps(profile, present, python_version, request.config, cache, progress)
    with cache.workdir("plan-") as scratch:
        plan = make_plan(
            info,
            profile,
            request.models,
            request.config,
            base_from=base_from,
            profile_files=_profile_files(profile, profiles_dir),
            python_deps=deps,
            scratch=scratch,
        )
        dockerfile = write_context(plan, _context_dir(request, profile), source_date_epoch())
    progress.step(
        f"wrote the build context for {info.name} {info.version} ({profile.name}): {dockerfile.parent}"
    )
    return PackagedImage(
        profile.name, info.name, info.version, dockerfile=dockerfile, seconds=time.monotonic() - started
    )


def _build_and_push(
    request: PackageRequest,
    profile: DeviceProfile,
    base: BaseImage,
    registry: RegistryClient | None,
    client: docker.DockerClient,
    cache: BuildCache,
    progress: Progress,
    profiles_dir: Path | None,
) -> PackagedImage:
    started = time.monotonic()
    info = _module_info(request, profile)
    what = f"{info.name} {info.version} ({profile.name})"
    repository = request.repository or info.name
    tag = f"{info.version}-{profile.name}"
    final_tag = f"{registry.address}/{repository}:{tag}" if registry else f"{repository}:{tag}"
    staging_tag = f"{STAGING_REPO}/{repository}:{tag}-{os.getpid()}"
    epoch = source_date_epoch()
    deps = python_deps(profile, base.python, base.python_version, request.config, cache, progress)
    input_sample, _ = request.config.samples()
    progress.step(f"assembling {what} on {base.registry_ref or base.local_ref}")
    with cache.workdir("image-") as work:
        plan = make_plan(
            info,
            profile,
            request.models,
            request.config,
            base_from=base.registry_ref or base.local_ref,
            profile_files=_profile_files(profile, profiles_dir),
            python_deps=deps,
            scratch=work / "generated",
        )
        image = assemble(plan, base, cache, epoch, progress)
        archive = work / "image.tar"
        try:
            new_blobs = {layer.digest: layer.path for _, layer in image.new_layers}
            write_load_archive(archive, image.docs, new_blobs, [staging_tag])
        except OSError as exc:
            raise os_error(exc, f"writing the image archive in {work}") from None
        progress.step(f"loading {what} into Docker Engine")
        engine.load_archive(client, archive, progress)
    result = PackagedImage(
        profile.name,
        info.name,
        info.version,
        image_id=image.docs.config_digest,
        layers=[(name, layer.size, layer.digest) for name, layer in image.new_layers],
    )
    try:
        if request.smoke:
            _smoke(client, staging_tag, what, profile, input_sample, progress)
        if registry is not None:
            progress.step(f"pushing {what} to {registry.address}/{repository}")
            mounts = (
                {layer.digest: base.repository for layer in base.docs.layers()} if base.registry_ref else {}
            )
            pushed = push_image(registry, repository, image.docs, image.blobs, [tag], progress, mounts)
            result.push = pushed
            result.bytes_pushed = pushed.bytes_pushed
            result.ref = pushed.ref
        engine.tag(client, image.docs.config_digest, final_tag)
        result.local_tag = final_tag
    finally:
        engine.remove_tag(client, staging_tag)
    result.seconds = time.monotonic() - started
    sent = f", {human_bytes(result.bytes_pushed)} pushed" if registry is not None else ""
    progress.step(f"packaged {what}: {result.ref or final_tag}{sent} in {result.seconds:.1f} s")
    return result


def _smoke(
    client: docker.DockerClient,
    image: str,
    what: str,
    profile: DeviceProfile,
    input_sample: object,
    progress: Progress,
) -> None:
    if profile.strict and not profile.detect.always:
        progress.step(f"smoke check skipped: profile {profile.name} is strict and needs its accelerator")
        return
    smoke_run(client, image, what, progress, input_sample=input_sample)


def raise_for_disk(cache: BuildCache, request: PackageRequest) -> None:
    """DiskFullError when the cache's disk cannot hold the models about twice over."""
    total = sum(src.stat().st_size for m in request.models for _, src in m.files)
    cache.require_space(2 * total + 64_000_000, "packaging")
