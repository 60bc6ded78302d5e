"""A device profile's ``ContainerAccess`` as Docker Engine container options.

Docker does not expand globs in ``--device``; profiles may name ``/dev/xclmgmt*``, so the host's
device nodes are matched here (under ``root``, ``/`` on a device, a temporary tree in tests). The
group that owns each device node is added to the container, because a non-root user in the image
may open a node only through its group and group ids differ between host and image.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.contract import ContainerAccess

_GLOB_CHARS = frozenset("*?[")


class AccessError(ValueError):
    """The host lacks what a profile's container access names (e.g. no device node matches)."""


@dataclass(frozen=True)
class DockerAccess:
    """Options for ``containers.create``: ``devices``, ``device_requests``, ``volumes`` and so on."""

    devices: list[str] = field(default_factory=list)
    device_cgroup_rules: list[str] = field(default_factory=list)
    volumes: list[str] = field(default_factory=list)
    group_add: list[str] = field(default_factory=list)
    privileged: bool = False
    gpus: dict[str, Any] | None = None
    """``DeviceRequest`` arguments (driver, count, capabilities), or None."""

    def create_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``docker.DockerClient.containers.create``."""
        from docker.types import DeviceRequest

        kwargs: dict[str, Any] = {}
        if self.devices:
            kwargs["devices"] = self.devices
        if self.device_cgroup_rules:
            kwargs["device_cgroup_rules"] = self.device_cgroup_rules
        if self.volumes:
            kwargs["volumes"] = self.volumes
        if self.group_add:
            kwargs["group_add"] = self.group_add
        if self.privileged:
            kwargs["privileged"] = True
        if self.gpus is not None:
            kwargs["device_requests"] = [DeviceRequest(**self.gpus)]
        return kwargs


def _host_path(path: str, root: Path) -> Path:
    return root / path.lstrip("/")


def expand_devices(entries: list[str], root: Path = Path("/")) -> list[str]:
    """``host[:container[:perms]]`` entries with globs in the host part expanded to the nodes present.

    A glob keeps the matched node's own path inside the container; a plain path is passed on as
    written. Raises :class:`AccessError` naming the entry when nothing matches or a path is missing.
    """
    out: list[str] = []
    for entry in entries:
        host, _, rest = entry.partition(":")
        if _GLOB_CHARS.isdisjoint(host):
            if not _host_path(host, root).exists():
                raise AccessError(f"device {host} (from {entry!r}) does not exist on this host")
            out.append(entry)
            continue
        if rest:
            raise AccessError(f"device entry {entry!r}: a glob cannot name a container path")
        matches = sorted(glob.glob(str(_host_path(host, root))))
        if not matches:
            raise AccessError(f"no device node matches {host} on this host")
        out += ["/" + str(Path(m).relative_to(root)) for m in matches]
    return out


def device_groups(devices: list[str], root: Path = Path("/")) -> list[str]:
    """The numeric group ids owning the host side of ``devices`` (sorted, without duplicates)."""
    gids: set[int] = set()
    for entry in devices:
        host = entry.partition(":")[0]
        try:
            gids.add(os.stat(_host_path(host, root)).st_gid)
        except OSError:
            continue
    return [str(g) for g in sorted(gids) if g != 0]


def docker_access(access: ContainerAccess, root: Path = Path("/")) -> DockerAccess:
    """The Docker options that give a container what ``access`` asks for on this host."""
    devices = expand_devices(access.devices, root)
    groups = list(dict.fromkeys([*access.group_add, *device_groups(devices, root)]))
    gpus = None
    if access.gpus is not None:
        gpus = {
            "driver": access.gpus.driver,
            "count": access.gpus.count,
            "capabilities": [list(access.gpus.capabilities)],
        }
    return DockerAccess(
        devices=devices,
        device_cgroup_rules=list(access.device_cgroup_rules),
        volumes=list(access.volumes),
        group_add=groups,
        privileged=access.privileged,
        gpus=gpus,
    )
