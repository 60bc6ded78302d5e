"""ORM tables of the cloud state (SQLite or PostgreSQL through SQLAlchemy 2).

Model registry: ``models`` (one row per name, with the last version number handed out, so numbers
are never reused), ``model_versions``, ``model_tags``, ``model_files`` (path, size, hash of each
file of a version) and ``blobs`` (one row per distinct content, stored once on disk).

Deployments: ``deployments`` and ``deployment_models`` (which model versions a deployment uses; a
version in use cannot be deleted). Devices and their reported state get their own tables later.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from modules.contract import utcnow

NAME_LEN = 63
SHA256_LEN = 64


class Base(DeclarativeBase):
    """Declarative base holding the metadata of every table."""


class SchemaVersion(Base):
    """A single row recording which schema version the database holds."""

    __tablename__ = "schema_version"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[int] = mapped_column(Integer)


class Model(Base):
    """A model name; its versions are numbered 1, 2, ... and never reused."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    versions: Mapped[list[ModelVersion]] = relationship(
        back_populates="model", cascade="all, delete-orphan", passive_deletes=True
    )


class ModelVersion(Base):
    """One registered version of a model: a set of files plus metadata."""

    __tablename__ = "model_versions"
    __table_args__ = (UniqueConstraint("model_id", "version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    framework: Mapped[str] = mapped_column(String(32))
    description: Mapped[str] = mapped_column(Text, default="")
    source: Mapped[str] = mapped_column(Text, default="", doc="the path it was registered from")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    model: Mapped[Model] = relationship(back_populates="versions")
    files: Mapped[list[ModelFile]] = relationship(
        back_populates="model_version",
        cascade="all, delete-orphan",
        passive_deletes=True,
        order_by="ModelFile.path",
    )
    tags: Mapped[list[ModelTag]] = relationship(
        cascade="all, delete-orphan", passive_deletes=True, order_by="ModelTag.key"
    )


class ModelTag(Base):
    """A ``key=value`` tag of a model version."""

    __tablename__ = "model_tags"

    model_version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    value: Mapped[str] = mapped_column(String(256))


class Blob(Base):
    """Content stored once under its sha256, whatever the number of files that hold it."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(String(SHA256_LEN), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelFile(Base):
    """A file of a model version: its relative path and the blob with its bytes."""

    __tablename__ = "model_files"
    __table_args__ = (UniqueConstraint("model_version_id", "path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model_version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="CASCADE"), index=True
    )
    path: Mapped[str] = mapped_column(String(1024))
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(ForeignKey("blobs.sha256", ondelete="RESTRICT"), index=True)

    model_version: Mapped[ModelVersion] = relationship(back_populates="files")


class Deployment(Base):
    """A deployment declared by an operator; ``manifest`` holds its DeploymentManifest as JSON."""

    __tablename__ = "deployments"

    name: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    manifest: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class DeploymentRevision(Base):
    """One apply of a deployment that changed its manifest: what was applied, from where, when."""

    __tablename__ = "deployment_revisions"

    deployment: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    number: Mapped[int] = mapped_column(Integer, primary_key=True)
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    models: Mapped[list[str]] = mapped_column(JSON, default=list)
    source: Mapped[str] = mapped_column(Text, default="")
    applied_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ModelFollow(Base):
    """A deployment's module that follows the newest version of a model (continuous deployment):
    registering a version packages it into the module's images and applies the deployment."""

    __tablename__ = "model_follows"

    deployment: Mapped[str] = mapped_column(
        ForeignKey("deployments.name", ondelete="CASCADE"), primary_key=True
    )
    module: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    model: Mapped[str] = mapped_column(String(NAME_LEN), index=True)
    config_path: Mapped[str | None] = mapped_column(Text, nullable=True)
    """The inference config file packaging reads (absolute; None: no-code ONNX)."""
    image_registry: Mapped[str | None] = mapped_column(String(255), nullable=True)
    repository: Mapped[str | None] = mapped_column(String(255), nullable=True)
    smoke: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class DeploymentModel(Base):
    """A model version used by a deployment; the foreign key refuses deleting a version in use."""

    __tablename__ = "deployment_models"

    deployment_name: Mapped[str] = mapped_column(
        ForeignKey("deployments.name", ondelete="CASCADE"), primary_key=True
    )
    model_version_id: Mapped[int] = mapped_column(
        ForeignKey("model_versions.id", ondelete="RESTRICT"), primary_key=True, index=True
    )
