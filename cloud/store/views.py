"""What the registry returns: plain immutable values, never ORM rows."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Framework = Literal["onnx", "openvino", "sklearn", "pytorch", "tensorflow", "custom"]
FRAMEWORKS: tuple[str, ...] = ("onnx", "openvino", "sklearn", "pytorch", "tensorflow", "custom")


class View(BaseModel):
    """Base of the registry's views: frozen, dumpable to JSON with ``model_dump(mode="json")``."""

    model_config = ConfigDict(frozen=True)


class FileView(View):
    """One file of a model version."""

    path: str
    size: int
    sha256: str


class VersionSummary(View):
    """A model version as ``model list`` shows it."""

    name: str
    version: int
    framework: Framework
    description: str
    tags: dict[str, str]
    created_at: datetime
    file_count: int
    size: int


class VersionView(VersionSummary):
    """A model version with its files and the deployments that use it."""

    source: str
    files: list[FileView]
    deployments: list[str] = Field(default_factory=list)
    identical_to: int | None = None
    """On registration: the latest version already had exactly these files."""
    follows: list[str] = Field(
        default_factory=list,
        description="on registration: the deployment/module pairs that follow this model (continuous "
        "deployment) and get the new version",
    )
    created: bool = True
    """On registration with ``if_changed``: false when nothing new was stored."""


class DeletedVersions(View):
    """What ``delete`` removed: versions, and blobs no other version needed."""

    name: str
    versions: list[int]
    blobs_removed: int
    bytes_freed: int


class DownloadedFiles(View):
    """Files that ``download`` wrote, each checked against its hash."""

    name: str
    version: int
    out_dir: str
    files: list[FileView]
