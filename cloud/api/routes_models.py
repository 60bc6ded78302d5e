"""``/models``: register (upload), list, show, download and delete model versions.

Uploads are spooled into ``<data dir>/uploads`` (the blob store's file system) with a byte limit
(413 beyond it), then registered with ``Registry.register`` exactly as ``edgectl model register``
registers a local folder; the spool folder is removed afterwards either way. A multipart part's
filename is the file's path inside the version (``ir/model.xml``); percent-escapes in it are
decoded, since aiohttp's and some other clients escape the ``/``. A malformed multipart body (no
or a bad boundary, a part without a Content-Disposition, a bad header line, a truncated body, an
encoded part) is a 400 naming what is wrong, never a 500.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import shutil
import tempfile
import unicodedata
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import quote, unquote

from aiohttp import BodyPartReader, MultipartReader, web
from aiohttp.helpers import parse_mimetype
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.multipart import content_disposition_filename, parse_content_disposition

from cloud import continuous
from cloud.api.context import Services
from cloud.api.errors import ApiError
from cloud.api.routing import (
    Body,
    Param,
    Route,
    call,
    query_bool,
    query_tags,
    reply,
    require_media,
    services,
    version_param,
)
from cloud.store.registry import check_model_name
from cloud.store.views import FRAMEWORKS, DeletedVersions, VersionSummary, VersionView

CHUNK = 256 * 1024
UPLOAD_TYPES = ("application/octet-stream", "multipart/form-data")
MAX_PATH_CHARS = 1024
MAX_NAME_BYTES = 255
MAX_BOUNDARY_CHARS = 70  # RFC 2046
PLAIN_TRANSFER_ENCODINGS = ("", "binary", "7bit", "8bit")
TAG_PARAM = Param(
    "tag", "KEY=VALUE; repeatable; versions must carry every tag", {"type": "string"}, repeated=True
)

log = logging.getLogger(__name__)


def _relative_path(raw: str | None, where: str) -> PurePosixPath:
    """A safe relative path for an uploaded file; 400 naming ``where`` otherwise.

    Refused: absolute paths, empty, ``.`` and ``..`` parts, backslashes and double quotes, control
    and other non-printing characters, parts over ``MAX_NAME_BYTES`` and paths over ``MAX_PATH_CHARS``.
    """
    if not raw:
        raise ApiError(400, f"{where}: a file name is required")
    path = PurePosixPath(raw)
    if "\\" in raw or path.is_absolute() or any(p in ("", ".", "..") for p in raw.split("/")):
        raise ApiError(400, f"{where}: file name {raw!r} must be a relative path without '.' or '..'")
    bad = next((c for c in raw if c == '"' or unicodedata.category(c)[0] == "C"), None)
    if bad is not None:
        raise ApiError(
            400, f"{where}: file name {raw!r} holds {bad!r}: control characters and '\"' are not allowed"
        )
    if len(raw) > MAX_PATH_CHARS or any(len(p.encode()) > MAX_NAME_BYTES for p in path.parts):
        raise ApiError(
            400,
            f"{where}: file name {raw[:80]!r}... is too long "
            f"({MAX_PATH_CHARS} characters in all, {MAX_NAME_BYTES} bytes per folder or file name)",
        )
    return path


def _content_disposition(name: str) -> str:
    """``attachment`` naming ``name``: RFC 6266 ``filename*`` in UTF-8, with an ASCII fallback."""
    fallback = "".join(c if c.isascii() and (c.isalnum() or c in "._-+") else "_" for c in name) or "file"
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


class _Spool:
    """Writes uploaded files under a temporary folder, counting bytes against the limit."""

    def __init__(self, root: Path, limit: int) -> None:
        self.root = root
        self.limit = limit
        self.total = 0
        self.files: set[PurePosixPath] = set()

    def create(self, rel: PurePosixPath, where: str) -> BinaryIO:
        """Open the new file ``rel`` for writing; 400 when it clashes with another (or is a folder of one)."""
        clash = rel in self.files or any(p in self.files for p in rel.parents)
        if clash or any(rel in f.parents for f in self.files):
            raise ApiError(400, f"{where}: file {str(rel)!r} given twice or clashes with another file")
        dst = self.root.joinpath(*rel.parts)
        try:
            dst.parent.mkdir(parents=True, exist_ok=True)
            out = dst.open("xb")
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ApiError(507, f"{where}: no space left to store {str(rel)!r}") from None
            raise ApiError(400, f"{where}: cannot store file {str(rel)!r}: {e.strerror or e}") from None
        self.files.add(rel)
        return out

    async def write(self, out: BinaryIO, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.total > self.limit:
            raise ApiError(413, f"upload is over the limit of {self.limit} bytes")
        await call(out.write, chunk)


async def _spool_raw(request: web.Request, spool: _Spool) -> None:
    name = request.query.get("filename")
    if not name and "Content-Disposition" in request.headers:
        _kind, params = parse_content_disposition(request.headers["Content-Disposition"])
        name = content_disposition_filename(params, "filename")
    rel = _relative_path(name, "query parameter filename (or Content-Disposition)")
    with await call(spool.create, rel, "filename") as out:
        async for chunk in request.content.iter_chunked(CHUNK):
            await spool.write(out, chunk)


def _multipart_reader(request: web.Request) -> MultipartReader:
    """A reader for the body; 400 when the Content-Type has no usable boundary."""
    boundary = parse_mimetype(request.headers.get("Content-Type", "")).parameters.get("boundary", "")
    if not boundary or len(boundary) > MAX_BOUNDARY_CHARS:
        raise ApiError(
            400,
            f"Content-Type {request.headers.get('Content-Type', '')!r}: multipart/form-data needs a "
            f"boundary parameter of 1 to {MAX_BOUNDARY_CHARS} characters",
        )
    return MultipartReader(request.headers, request.content)


def _check_part(part: BodyPartReader, where: str) -> None:
    """400 for a part that names nothing or whose bytes are encoded (they are stored as sent)."""
    if part.name is None and part.filename is None:
        raise ApiError(
            400,
            f"{where}: no usable Content-Disposition header "
            '(expected \'form-data; name="files"; filename="PATH"\' or a field name)',
        )
    encoding = part.headers.get("Content-Encoding", "identity").strip().lower()
    transfer = part.headers.get("Content-Transfer-Encoding", "").strip().lower()
    if encoding != "identity" or transfer not in PLAIN_TRANSFER_ENCODINGS:
        raise ApiError(
            400,
            f"{where}: encoded parts are not supported (Content-Encoding {encoding!r}, "
            f"Content-Transfer-Encoding {transfer!r}); send the bytes as they are",
        )


async def _spool_multipart(request: web.Request, spool: _Spool, fields: dict[str, list[str]]) -> None:
    reader = _multipart_reader(request)
    index = 0
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                raise ApiError(400, f"multipart part {index}: nested multipart bodies are not supported")
            where = f"multipart part {index} ({part.name or 'unnamed'})"
            _check_part(part, where)
            if part.filename is None:
                if part.name not in ("tag", "description", "framework"):
                    raise ApiError(
                        400, f"{where}: unknown field; send files, 'tag', 'description', 'framework'"
                    )
                value = await part.read()
                if len(value) > 64 * 1024:
                    raise ApiError(413, f"{where}: field is over 64 KiB")
                fields.setdefault(part.name, []).append(value.decode("utf-8", errors="replace"))
            else:
                with await call(spool.create, _relative_path(unquote(part.filename), where), where) as out:
                    while chunk := await part.read_chunk(CHUNK):
                        await spool.write(out, chunk)
            index += 1
    except (ValueError, HttpProcessingError) as e:
        raise ApiError(400, f"malformed multipart body at part {index}: {_parse_problem(e)}") from None
    if not spool.files:
        raise ApiError(400, "multipart body holds no file part (give each file a filename)")


def _parse_problem(e: ValueError | HttpProcessingError) -> str:
    """aiohttp's complaint about a body, in words a client can act on."""
    if isinstance(e, HttpProcessingError):
        return f"bad part header ({e.message.strip() or 'unparseable'})"
    text = str(e)
    if text == "Reading after EOF":
        return "the body ends before the closing boundary (truncated?)"
    return text


def _one(fields: dict[str, list[str]], request: web.Request, name: str) -> str | None:
    values = [*request.query.getall(name, []), *fields.get(name, [])]
    if len(values) > 1:
        raise ApiError(400, f"{name} given {len(values)} times; give it once")
    return values[0] if values else None


async def register_model(request: web.Request) -> web.Response:
    """Register the uploaded file(s) as the next version of ``{name}``."""
    s = services(request)
    name = request.match_info["name"]
    check_model_name(name)
    media = require_media(request, UPLOAD_TYPES)
    if request.content_length is not None and request.content_length > s.upload_max:
        raise ApiError(413, f"upload of {request.content_length} bytes is over the limit of {s.upload_max}")
    await call(s.upload_dir.mkdir, parents=True, exist_ok=True)
    spool_dir = Path(await call(tempfile.mkdtemp, dir=s.upload_dir, prefix=f"{name}-"))
    try:
        spool = _Spool(spool_dir / "files", s.upload_max)
        fields: dict[str, list[str]] = {}
        if media == "multipart/form-data":
            await _spool_multipart(request, spool, fields)
        else:
            await _spool_raw(request, spool)
        tags = query_tags(request)
        for item in fields.get("tag", []):
            key, sep, value = item.partition("=")
            if not sep or not key or key in tags:
                raise ApiError(400, f"multipart field tag={item!r}: expected KEY=VALUE, each key once")
            tags[key] = value
        view = await call(
            s.registry.register,
            spool.root,
            name,
            tags=tags,
            description=_one(fields, request, "description") or "",
            framework=_one(fields, request, "framework"),
            source="upload:" + ",".join(sorted(str(f) for f in spool.files)),
            if_changed=query_bool(request, "if_changed"),
        )
    finally:
        await call(shutil.rmtree, spool_dir, ignore_errors=True)
    if view.created and not query_bool(request, "no_follow"):
        view = await _follow(s, view)
    return reply(view, 201 if view.created else 200, {"Location": f"/models/{view.name}/{view.version}"})


def _log_failure(job: asyncio.Future[Any]) -> None:
    """A continuous deployment that failed unexpectedly is logged, not lost."""
    if not job.cancelled() and job.exception() is not None:
        log.error("continuous deployment failed", exc_info=job.exception())


async def _follow(s: Services, view: VersionView) -> VersionView:
    """Start rolling the new version out to the modules that follow the model, in the background.

    Packaging takes minutes, so the answer only names them (``follows``); ``GET
    /deployments/{name}`` and the server's log say how each rollout went.
    """
    following = await call(continuous.follows, s.db, model=view.name)
    if not following:
        return view
    job = asyncio.ensure_future(
        call(continuous.follow_new_version, s.fleet, s.registry, view.name, view.version, endpoint=s.endpoint)
    )
    s.background.add(job)
    job.add_done_callback(s.background.discard)
    job.add_done_callback(_log_failure)
    return view.model_copy(update={"follows": [f"{f.deployment}/{f.module}" for f in following]})


async def list_models(request: web.Request) -> web.Response:
    """Model versions, optionally of one name and carrying given tags."""
    s = services(request)
    return reply(await call(s.registry.list_versions, request.query.get("name"), query_tags(request)))


async def show_model(request: web.Request) -> web.Response:
    """The latest version of a model, with its files and the deployments using it."""
    s = services(request)
    return reply(await call(s.registry.show, request.match_info["name"], None))


async def show_model_version(request: web.Request) -> web.Response:
    """One version (or ``latest``) with its files and the deployments using it."""
    s = services(request)
    return reply(await call(s.registry.show, request.match_info["name"], version_param(request)))


async def delete_model(request: web.Request) -> web.Response:
    """Delete every version of a model and its name; 409 while a deployment uses one."""
    s = services(request)
    return reply(await call(s.registry.delete, request.match_info["name"], None, all_versions=True))


async def delete_model_version(request: web.Request) -> web.Response:
    """Delete one version; 409 while a deployment uses it."""
    s = services(request)
    version = version_param(request)
    if version is None:
        raise ApiError(400, "give a version number to delete ('latest' is not accepted here)")
    return reply(await call(s.registry.delete, request.match_info["name"], version))


async def download_model_file(request: web.Request) -> web.StreamResponse:
    """One file of a version, streamed from the blob store; ``X-Content-SHA256`` is its hash."""
    s = services(request)
    view = await call(s.registry.show, request.match_info["name"], version_param(request))
    path = request.match_info["path"]
    found = next((f for f in view.files if f.path == path), None)
    if found is None:
        raise ApiError(
            404,
            f"model {view.name}:{view.version} has no file {path!r}",
            {"files": [f.path for f in view.files]},
        )
    blob = s.registry.blobs.path(found.sha256)
    if not await call(blob.is_file):
        raise ApiError(
            500, f"blob {found.sha256} of {view.name}:{view.version}/{path} is missing from the store"
        )
    return web.FileResponse(
        blob,
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Disposition": _content_disposition(PurePosixPath(path).name),
            "X-Content-SHA256": found.sha256,
        },
    )


_UPLOAD_BODY = Body(
    {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "one part per file; its filename is the path inside the version",
                    },
                    "tag": {"type": "array", "items": {"type": "string"}, "description": "KEY=VALUE"},
                    "description": {"type": "string"},
                    "framework": {"type": "string", "enum": list(FRAMEWORKS)},
                },
            }
        },
    },
    "a single file (with ?filename=) or several files as multipart parts",
)

ROUTES = (
    Route(
        "GET",
        "/models",
        list_models,
        "List model versions",
        "models",
        response=list[VersionSummary],
        query=(Param("name", "only versions of this model", {"type": "string"}), TAG_PARAM),
        errors=(400,),
    ),
    Route(
        "POST",
        "/models/{name}",
        register_model,
        "Register uploaded files as the next version of a model",
        "models",
        response=VersionView,
        status=201,
        body=_UPLOAD_BODY,
        query=(
            Param("filename", "file name of a raw (application/octet-stream) upload", {"type": "string"}),
            TAG_PARAM,
            Param("description", "free text stored with the version", {"type": "string"}),
            Param(
                "framework",
                "default: guessed from file suffixes",
                {"type": "string", "enum": list(FRAMEWORKS)},
            ),
            Param(
                "if_changed",
                "true: store nothing when the files equal the latest version's; that version comes "
                "back with 200 and created=false",
                {"type": "boolean"},
            ),
            Param(
                "no_follow",
                "true: do not roll the new version out to the deployment modules that follow the model "
                "(by default they are re-packaged and applied in the background; the answer's 'follows' "
                "names them)",
                {"type": "boolean"},
            ),
        ),
        errors=(400, 413, 415, 507),
    ),
    Route(
        "GET",
        "/models/{name}",
        show_model,
        "Show the latest version of a model",
        "models",
        response=VersionView,
        errors=(404,),
    ),
    Route(
        "DELETE",
        "/models/{name}",
        delete_model,
        "Delete every version of a model",
        "models",
        response=DeletedVersions,
        errors=(404, 409),
    ),
    Route(
        "GET",
        "/models/{name}/{version}",
        show_model_version,
        "Show one model version (a number or 'latest')",
        "models",
        response=VersionView,
        errors=(400, 404),
    ),
    Route(
        "DELETE",
        "/models/{name}/{version}",
        delete_model_version,
        "Delete one model version",
        "models",
        response=DeletedVersions,
        errors=(400, 404, 409),
    ),
    Route(
        "GET",
        "/models/{name}/{version}/files/{path:.+}",
        download_model_file,
        "Download one file of a model version",
        "models",
        response_media="application/octet-stream",
        errors=(400, 404),
    ),
)
