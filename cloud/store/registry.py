"""The model registry: register, list, show, download and delete model versions.

A registration either completes or leaves nothing: files are staged into the blob store's temp area
first, then rows are written and blobs renamed into place in one transaction under the blob lock;
any failure rolls the rows back and removes what was staged or placed.
"""

from __future__ import annotations

import errno
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from sqlalchemy import Select, delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from cloud.config import Settings
from cloud.store.blobs import BlobStore, StagedBlob
from cloud.store.db import Database, open_database
from cloud.store.deployments import deployments_using
from cloud.store.errors import DiskFullError, InUseError, InvalidInputError, NotFoundError, StoreError
from cloud.store.models import Blob, Model, ModelFile, ModelTag, ModelVersion
from cloud.store.refs import check_name
from cloud.store.views import (
    FRAMEWORKS,
    DeletedVersions,
    DownloadedFiles,
    FileView,
    Framework,
    VersionSummary,
    VersionView,
)

ProgressFn = Callable[[int, int, str], None]
"""Called as ``progress(bytes_done, bytes_total, current_file)`` while hashing or copying."""

_TAG_KEY_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./-]{0,62}$")
_TAG_VALUE_MAX = 256
_SUFFIX_FRAMEWORKS: tuple[tuple[tuple[str, ...], Framework], ...] = (
    ((".onnx",), "onnx"),
    ((".xml",), "openvino"),
    ((".pt", ".pth"), "pytorch"),
    ((".pb", ".h5", ".keras", ".tflite"), "tensorflow"),
    ((".pkl", ".joblib"), "sklearn"),
)


def check_model_name(name: str) -> str:
    """Return ``name`` if it follows the contract's Name rules, else raise InvalidInputError."""
    return check_name(name, "model name")


def check_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """Validate tag keys and values; raise InvalidInputError naming the bad tag."""
    for key, value in tags.items():
        if not _TAG_KEY_RE.match(key):
            raise InvalidInputError(
                f"invalid tag key {key!r}: use 1-63 letters, digits, '_', '.', '/' or '-', "
                "starting with a letter or digit"
            )
        if len(value) > _TAG_VALUE_MAX or not value.isprintable():
            raise InvalidInputError(
                f"invalid value for tag {key!r}: at most {_TAG_VALUE_MAX} printable characters"
            )
    return dict(tags)


def collect_files(path: Path) -> list[tuple[str, Path]]:
    """The files to register from ``path``: ``(relative posix path, absolute path)``, sorted."""
    if not path.exists():
        raise InvalidInputError(f"model path {path} does not exist")
    if path.is_file():
        return [(path.name, path)]
    if not path.is_dir():
        raise InvalidInputError(f"model path {path} is not a regular file or folder")

    def walk_error(e: OSError) -> None:
        raise InvalidInputError(f"cannot read folder {e.filename}: {e.strerror or e}")

    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(path, onerror=walk_error):
        for d in dirnames:
            if os.path.islink(os.path.join(dirpath, d)):
                raise InvalidInputError(f"{os.path.join(dirpath, d)}: symlinked folders are not supported")
        for f in filenames:
            p = Path(dirpath, f)
            if not p.is_file():
                raise InvalidInputError(f"{p} is not a regular file (broken link, socket or device?)")
            found.append((p.relative_to(path).as_posix(), p))
    if not found:
        raise InvalidInputError(f"model folder {path} holds no files")
    return sorted(found)


def guess_framework(paths: Iterable[str]) -> Framework:
    """The framework suggested by file suffixes (ONNX first), ``custom`` when nothing matches."""
    suffixes = {PurePosixPath(p).suffix.lower() for p in paths}
    for known, framework in _SUFFIX_FRAMEWORKS:
        if suffixes.intersection(known):
            return framework
    return "custom"


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)


def _summary(v: ModelVersion) -> VersionSummary:
    return VersionSummary(
        name=v.model.name,
        version=v.version,
        framework=v.framework,
        description=v.description,
        tags={t.key: t.value for t in v.tags},
        created_at=_aware(v.created_at),
        file_count=len(v.files),
        size=sum(f.size for f in v.files),
    )


def _view(v: ModelVersion, deployments: list[str]) -> VersionView:
    return VersionView(
        **_summary(v).model_dump(),
        source=v.source,
        files=[FileView(path=f.path, size=f.size, sha256=f.sha256) for f in v.files],
        deployments=deployments,
    )


def _versions_query() -> Select[ModelVersion]:
    return select(ModelVersion).options(
        selectinload(ModelVersion.model), selectinload(ModelVersion.files), selectinload(ModelVersion.tags)
    )


class Registry:
    """Model versions in a database, their bytes in a content-addressed blob store."""

    def __init__(self, db: Database, blobs: BlobStore) -> None:
        self.db = db
        self.blobs = blobs

    @classmethod
    def open(cls, settings: Settings) -> Registry:
        """Open (creating if needed) the registry described by ``settings``."""
        return cls(open_database(settings.db_url), BlobStore(settings.blob_dir))

    def close(self) -> None:
        """Release database connections."""
        self.db.dispose()

    # ---------------------------------------------------------------------------------------- register

    def register(
        self,
        path: Path,
        name: str,
        *,
        tags: Mapping[str, str] | None = None,
        description: str = "",
        framework: str | None = None,
        progress: ProgressFn | None = None,
        source: str | None = None,
        if_changed: bool = False,
    ) -> VersionView:
        """Store the file or folder at ``path`` as the next version of ``name``.

        ``source`` is recorded as where the files came from (default: ``path``, absolute). When
        the files are exactly those of the latest version, the view's ``identical_to`` says so;
        with ``if_changed`` nothing is stored then and the latest version comes back with
        ``created`` false.
        """
        check_model_name(name)
        self.db.check_writable()
        clean_tags = check_tags(tags or {})
        if framework is not None and framework not in FRAMEWORKS:
            raise InvalidInputError(f"unknown framework {framework!r} (choose from {', '.join(FRAMEWORKS)})")
        files = collect_files(path)
        chosen: Framework = framework if framework is not None else guess_framework(p for p, _ in files)  # type: ignore[assignment]
        total = sum(p.stat().st_size for _, p in files)
        staged: list[tuple[str, StagedBlob]] = []
        try:
            done = 0
            for rel, src in files:

                def advance(n: int, rel: str = rel) -> None:
                    nonlocal done
                    done += n
                    if progress is not None:
                        progress(done, total, rel)

                staged.append((rel, self.blobs.stage(src, advance)))
            origin = source if source is not None else str(path.absolute())
            return self._commit_version(name, origin, clean_tags, description, chosen, staged, if_changed)
        finally:
            for _, st in staged:
                self.blobs.discard(st)

    def _commit_version(
        self,
        name: str,
        source: str,
        tags: dict[str, str],
        description: str,
        framework: Framework,
        staged: list[tuple[str, StagedBlob]],
        if_changed: bool = False,
    ) -> VersionView:
        placed: list[str] = []
        with self.blobs.lock():
            try:
                with self.db.transaction() as s:
                    model = s.scalar(select(Model).where(Model.name == name).with_for_update())
                    if model is None:
                        model = Model(name=name, last_version=0)
                        s.add(model)
                        s.flush()
                    latest = s.scalar(
                        _versions_query()
                        .where(ModelVersion.model_id == model.id)
                        .order_by(ModelVersion.version.desc())
                        .limit(1)
                    )
                    wanted = {(rel, st.sha256) for rel, st in staged}
                    same = latest is not None and {(f.path, f.sha256) for f in latest.files} == wanted
                    if same and if_changed:
                        assert latest is not None
                        view = _view(latest, deployments_using(s, [latest.id]).get(latest.id, []))
                        return view.model_copy(update={"identical_to": latest.version, "created": False})
                    model.last_version += 1
                    version = ModelVersion(
                        model=model,
                        version=model.last_version,
                        framework=framework,
                        description=description,
                        source=source,
                    )
                    version.tags = [ModelTag(key=k, value=v) for k, v in sorted(tags.items())]
                    s.add(version)
                    for rel, st in staged:
                        if s.get(Blob, st.sha256) is None:
                            s.add(Blob(sha256=st.sha256, size=st.size))
                            s.flush()
                        version.files.append(ModelFile(path=rel, size=st.size, sha256=st.sha256))
                    s.flush()
                    for rel, st in staged:
                        try:
                            if self.blobs.commit(st):
                                placed.append(st.sha256)
                        except OSError as e:
                            if e.errno == errno.ENOSPC:
                                raise DiskFullError(f"disk full while storing {rel}: {e.strerror}") from e
                            raise StoreError(f"cannot store {rel}: {e.strerror or e}") from e
                    view = _view(version, [])
                    if same:
                        assert latest is not None
                        view = view.model_copy(update={"identical_to": latest.version})
            except IntegrityError as e:
                self._remove_blobs(placed)
                raise StoreError(
                    f"model {name!r} was changed by someone else during registration; try again ({e.orig})"
                ) from e
            except BaseException:
                self._remove_blobs(placed)
                raise
        return view

    def _remove_blobs(self, digests: Iterable[str]) -> None:
        for sha in digests:
            self.blobs.remove(sha)

    # ------------------------------------------------------------------------------------- list / show

    def list_versions(
        self, name: str | None = None, tags: Mapping[str, str] | None = None
    ) -> list[VersionSummary]:
        """Every version (of ``name`` when given) carrying all of ``tags``, by name then version."""
        query = _versions_query().join(Model).order_by(Model.name, ModelVersion.version)
        if name is not None:
            query = query.where(Model.name == name)
        for key, value in (tags or {}).items():
            query = query.where(ModelVersion.tags.any((ModelTag.key == key) & (ModelTag.value == value)))
        with self.db.transaction() as s:
            return [_summary(v) for v in s.scalars(query)]

    def show(self, name: str, version: int | None = None) -> VersionView:
        """One version (the latest when ``version`` is None) with its files and users."""
        with self.db.transaction() as s:
            v = self._find(s, name, version)
            return _view(v, deployments_using(s, [v.id]).get(v.id, []))

    def _find(self, s: Session, name: str, version: int | None) -> ModelVersion:
        model_id = s.scalar(select(Model.id).where(Model.name == name))
        if model_id is None:
            raise NotFoundError(f"model {name!r} is not registered")
        query = _versions_query().where(ModelVersion.model_id == model_id)
        if version is None:
            found = s.scalar(query.order_by(ModelVersion.version.desc()).limit(1))
            if found is None:
                raise NotFoundError(f"model {name!r} has no versions left")
            return found
        found = s.scalar(query.where(ModelVersion.version == version))
        if found is None:
            existing = s.scalars(
                select(ModelVersion.version)
                .where(ModelVersion.model_id == model_id)
                .order_by(ModelVersion.version)
            ).all()
            have = ", ".join(map(str, existing)) or "none"
            raise NotFoundError(f"model {name!r} has no version {version} (versions: {have})")
        return found

    # ---------------------------------------------------------------------------------------- download

    def download(
        self,
        name: str,
        version: int | None,
        out_dir: Path,
        *,
        overwrite: bool = False,
        progress: ProgressFn | None = None,
    ) -> DownloadedFiles:
        """Write a version's files under ``out_dir``, each checked against its sha256."""
        view = self.show(name, version)
        targets = []
        for f in view.files:
            rel = PurePosixPath(f.path)
            if rel.is_absolute() or ".." in rel.parts:
                raise StoreError(f"model {name}:{view.version} holds an unsafe path {f.path!r}")
            dst = out_dir.joinpath(*rel.parts)
            if dst.exists() and not overwrite:
                raise InvalidInputError(f"{dst} already exists (pass --force to overwrite)")
            targets.append((f, dst))
        total = sum(f.size for f in view.files)
        done = 0
        temps: list[tuple[Path, Path]] = []
        try:
            for f, dst in targets:

                def advance(n: int, rel: str = f.path) -> None:
                    nonlocal done
                    done += n
                    if progress is not None:
                        progress(done, total, rel)

                try:
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=f".{dst.name}.")
                except OSError as e:
                    raise _write_error(e, dst) from e
                temps.append((Path(tmp_name), dst))
                try:
                    with os.fdopen(fd, "wb") as out:
                        self.blobs.copy_out(f.sha256, out, advance)
                except OSError as e:
                    raise _write_error(e, dst) from e
            for tmp, dst in temps:
                os.replace(tmp, dst)
        finally:
            for tmp, _ in temps:
                tmp.unlink(missing_ok=True)
        return DownloadedFiles(name=name, version=view.version, out_dir=str(out_dir), files=view.files)

    # ------------------------------------------------------------------------------------------ delete

    def delete(self, name: str, version: int | None = None, *, all_versions: bool = False) -> DeletedVersions:
        """Delete one version, or every version and the name itself when ``all_versions``.

        Refused (InUseError naming the deployments) when a deployment uses any of them.
        """
        if (version is None) == (not all_versions):
            raise InvalidInputError("give either one version or all versions to delete")
        self.db.check_writable()
        with self.blobs.lock():
            with self.db.transaction() as s:
                model = s.scalar(select(Model).where(Model.name == name))
                if model is None:
                    raise NotFoundError(f"model {name!r} is not registered")
                doomed = (
                    [self._find(s, name, version)]
                    if version is not None
                    else list(s.scalars(_versions_query().where(ModelVersion.model_id == model.id)))
                )
                users = deployments_using(s, [v.id for v in doomed])
                for v in doomed:
                    if v.id in users:
                        deps = ", ".join(repr(d) for d in users[v.id])
                        raise InUseError(
                            f"model {name}:{v.version} is used by deployment {deps}; "
                            "remove it from the deployment first"
                        )
                digests = {f.sha256 for v in doomed for f in v.files}
                numbers = sorted(v.version for v in doomed)
                for v in doomed:
                    s.delete(v)
                if all_versions:
                    s.delete(model)
                s.flush()
                still_used = set(
                    s.scalars(select(ModelFile.sha256).where(ModelFile.sha256.in_(digests)).distinct())
                )
                orphans = sorted(digests - still_used)
                freed = s.scalar(
                    select(func.coalesce(func.sum(Blob.size), 0)).where(Blob.sha256.in_(orphans))
                )
                s.execute(delete(Blob).where(Blob.sha256.in_(orphans)))
            self._remove_blobs(orphans)
        return DeletedVersions(
            name=name, versions=numbers, blobs_removed=len(orphans), bytes_freed=int(freed or 0)
        )


def _write_error(e: OSError, dst: Path) -> StoreError:
    if e.errno == errno.ENOSPC:
        return DiskFullError(f"disk full while writing {dst}: {e.strerror}")
    return StoreError(f"cannot write {dst}: {e.strerror or e}")
