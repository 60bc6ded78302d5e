"""Names the runtimes put on what they create, and image reference spellings Docker Engine uses.

Every container the agent creates carries ``io.edgedeploy.managed=true`` and its module name (plus
its config hash, image reference, profile, version and the desired state's generation); the
Docker runtime lists, touches and removes nothing without them (and, when the runtime has a
``device_id``, nothing without ``io.edgedeploy.device=<id>`` either, so several agents can share
one engine in simulations and tests).
"""

from __future__ import annotations

from modules.contract import split_image_ref

PREFIX = "io.edgedeploy."
MANAGED = PREFIX + "managed"
MODULE = PREFIX + "module"
DEVICE = PREFIX + "device"
CONFIG_HASH = PREFIX + "config-hash"
IMAGE = PREFIX + "image"
VERSION = PREFIX + "version"
GENERATION = PREFIX + "generation"
"""The generation of the desired state the container was created from."""
PROFILE = PREFIX + "profile"
INSTANCE = PREFIX + "instance"
"""The container's instance id, also its ``EDGE_INSTANCE_ID``: health probes check the echo."""

DEFAULT_NAME_PREFIX = "edge-"

_DOCKER_HUB = ("docker.io/", "index.docker.io/", "registry-1.docker.io/")


def ownership_filters(device_id: str | None) -> list[str]:
    """Docker ``label`` filters that select exactly this agent's containers."""
    filters = [f"{MANAGED}=true"]
    if device_id is not None:
        filters.append(f"{DEVICE}={device_id}")
    return filters


def is_ours(labels: dict[str, str] | None, device_id: str | None) -> bool:
    """True when a container's labels say this agent created it."""
    labels = labels or {}
    if labels.get(MANAGED) != "true" or not labels.get(MODULE):
        return False
    return device_id is None or labels.get(DEVICE) == device_id


def familiar_repository(repository: str) -> str:
    """The repository as Docker Engine writes it in RepoTags/RepoDigests (``docker.io/library/x`` → ``x``)."""
    for hub in _DOCKER_HUB:
        if repository.startswith(hub):
            repository = repository[len(hub) :]
            break
    if repository.startswith("library/") and repository.count("/") == 1:
        return repository.removeprefix("library/")
    return repository


def familiar_name(image: str) -> str:
    """The repository of an image reference as Docker Engine writes it (``docker.io/library/x:1`` → ``x``)."""
    return familiar_repository(split_image_ref(image).repository)


def pull_reference(image: str) -> tuple[str, str]:
    """``(repository, tag_or_digest)`` to pull: the digest when the reference pins one, else the tag."""
    parts = split_image_ref(image)
    return parts.repository, parts.digest or parts.tag or "latest"


def local_reference(image: str) -> str:
    """The reference to create a container from: ``repo@digest`` when pinned, else ``repo:tag``."""
    parts = split_image_ref(image)
    if parts.digest:
        return f"{parts.repository}@{parts.digest}"
    return f"{parts.repository}:{parts.tag or 'latest'}"


def loaded_tag(image: str) -> str:
    """The ``repo:tag`` an image loaded by the agent (``docker load``) carries: its own tag, or
    ``repo:sha256-<hex>`` for a reference pinned by digest (a load cannot set a repository digest)."""
    parts = split_image_ref(image)
    if parts.digest:
        return f"{parts.repository}:{parts.digest.replace(':', '-')}"
    return f"{parts.repository}:{parts.tag or 'latest'}"


def presence_keys(image: str) -> frozenset[str]:
    """What may appear in an image's RepoTags or RepoDigests for ``image`` to be local: the
    ``presence_key``, or the tag of an image the agent loaded itself (``loaded_tag``)."""
    loaded = loaded_tag(image)
    return frozenset({presence_key(image), familiar_name(loaded) + ":" + loaded.rsplit(":", 1)[1]})


def presence_key(image: str) -> str:
    """What must appear in an image's RepoDigests (pinned) or RepoTags (by tag) for ``image`` to be local."""
    parts = split_image_ref(image)
    repo = familiar_repository(parts.repository)
    if parts.digest:
        return f"{repo}@{parts.digest}"
    return f"{repo}:{parts.tag or 'latest'}"
