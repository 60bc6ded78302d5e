"""``/packages``: package registered models into module images, as background jobs.

``POST /packages`` checks the request at once (models exist, profiles exist, files present: 400 or
404), then queues a job that runs ``cloud.packaging.package`` — what ``edgectl package`` runs —
off the event loop, one build at a time; ``GET /packages/{id}`` shows its state, its log lines
and, once done, each image by digest. Jobs live in the server's memory: a restart forgets them
(the images stay in the registry). Only the no-code ONNX path is offered here (the inference
config's plain fields, but no entry script or other files, which would name paths on the server),
and no ``--dockerfile`` output.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import deque
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from cloud.api.errors import ApiError
from cloud.api.routing import Body, Route, call, json_body, reply, services
from cloud.fleet.credentials import pull_auth
from cloud.inference_config import InferenceConfig
from cloud.packaging.errors import PackagingError
from cloud.packaging.models import models_from_registry
from cloud.packaging.package import PackagedImage, PackageRequest, check_request, package
from modules.contract import Name, utcnow

LOG_LINES = 500
MAX_JOBS = 200
"""Finished jobs beyond this many are forgotten, oldest first."""

ModelRefText = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,62}(:([1-9][0-9]*|latest))?$")
]


class PackageBody(BaseModel):
    """``POST /packages``: the options of ``edgectl package`` that make sense over HTTP."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelRefText] = Field(min_length=1, description="NAME or NAME:VERSION of registered models")
    profiles: list[Name] = Field(min_length=1, description="device profiles, one image each")
    name: Name | None = Field(default=None, description="module name (default: the model's name)")
    version: str | None = Field(default=None, max_length=128, description="default: the model's version")
    registry: str | None = Field(default=None, max_length=255, description="HOST:PORT of the OCI registry")
    repository: str | None = Field(default=None, max_length=255)
    smoke: bool = Field(default=True, description="run the image and check it serves before pushing")
    push: bool = True
    env: dict[str, str] = Field(default_factory=dict, description="environment of the scoring server")
    requirements: list[str] = Field(default_factory=list, description="extra pip requirement specifiers")
    input_sample: Any = Field(default=None, description="example request body (OpenAPI, smoke check)")
    output_sample: Any = None
    base_image: str | None = Field(default=None, description="replaces the profile's base image")

    def inference_config(self) -> InferenceConfig:
        """The inference config these fields describe (no entry script: the no-code ONNX path)."""
        return InferenceConfig(
            env=self.env,
            requirements=self.requirements,
            input_sample=self.input_sample,
            output_sample=self.output_sample,
            base_image=self.base_image,
        )


class LayerView(BaseModel):
    """One layer on top of the base image."""

    name: str
    size: int
    digest: str


class PackagedImageView(BaseModel):
    """One profile's image, as ``edgectl package --json`` prints it."""

    profile: str
    module: str
    version: str
    image: str | None
    local_tag: str | None
    image_id: str | None
    bytes_pushed: int
    layers: list[LayerView]
    seconds: float

    @classmethod
    def of(cls, r: PackagedImage) -> PackagedImageView:
        """The view of a packaging result."""
        return cls(
            profile=r.profile,
            module=r.module,
            version=r.version,
            image=r.ref,
            local_tag=r.local_tag,
            image_id=r.image_id,
            bytes_pushed=r.bytes_pushed,
            layers=[LayerView(name=n, size=s, digest=d) for n, s, d in r.layers],
            seconds=r.seconds,
        )


class PackageJob(BaseModel):
    """A packaging job and, once finished, its outcome."""

    id: str
    state: Literal["queued", "running", "succeeded", "failed"]
    request: PackageBody
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    results: list[PackagedImageView] = Field(default_factory=list)
    log: list[str] = Field(default_factory=list, description=f"the last {LOG_LINES} progress lines")


class _JobLog:
    """Packaging progress kept as lines (transfers only when complete)."""

    def __init__(self) -> None:
        self.lines: deque[str] = deque(maxlen=LOG_LINES)

    def step(self, message: str) -> None:
        self.lines.append(message)

    def transfer(self, label: str, done: int, total: int | None) -> None:
        if total is not None and done >= total:
            self.lines.append(f"{label}: {done} bytes")


class PackageJobs:
    """The server's packaging jobs, run one at a time."""

    def __init__(self) -> None:
        self.jobs: dict[str, PackageJob] = {}
        self.logs: dict[str, _JobLog] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._one_at_a_time = asyncio.Lock()

    def view(self, job_id: str) -> PackageJob:
        """The job with its current log; 404 for an unknown id."""
        job = self.jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"packaging job {job_id!r} does not exist (jobs are forgotten on restart)")
        return job.model_copy(update={"log": list(self.logs[job_id].lines)})

    def submit(self, body: PackageBody, request: PackageRequest, cache_dir: Path) -> PackageJob:
        """Queue ``request``; returns the new job."""
        self._forget_old()
        job = PackageJob(id=uuid.uuid4().hex[:12], state="queued", request=body, created_at=utcnow())
        self.jobs[job.id] = job
        self.logs[job.id] = _JobLog()
        task = asyncio.create_task(self._run(job.id, request, cache_dir), name=f"package-{job.id}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return job

    async def _run(self, job_id: str, request: PackageRequest, cache_dir: Path) -> None:
        async with self._one_at_a_time:
            self.jobs[job_id] = self.jobs[job_id].model_copy(
                update={"state": "running", "started_at": utcnow()}
            )
            update: dict[str, Any]
            try:
                results = await call(package, request, cache_dir=cache_dir, progress=self.logs[job_id])
            except PackagingError as e:
                update = {"state": "failed", "error": str(e)}
            except Exception as e:
                update = {"state": "failed", "error": f"unexpected {type(e).__name__}: {e}"}
            else:
                update = {"state": "succeeded", "results": [PackagedImageView.of(r) for r in results]}
            self.jobs[job_id] = self.jobs[job_id].model_copy(update={**update, "finished_at": utcnow()})

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.finished_at is not None]
        for job in sorted(finished, key=lambda j: j.created_at)[: max(0, len(self.jobs) - MAX_JOBS + 1)]:
            del self.jobs[job.id]
            del self.logs[job.id]

    async def close(self) -> None:
        """Cancel waiting jobs; a build already running finishes in its thread."""
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


jobs_key = web.AppKey("package_jobs", PackageJobs)


async def package_jobs_context(app: web.Application) -> AsyncIterator[None]:
    """``cleanup_ctx`` entry: the job list for the app's lifetime."""
    app[jobs_key] = PackageJobs()
    yield
    await app[jobs_key].close()


def _prepare(request: web.Request, body: PackageBody) -> PackageRequest:
    s = services(request)
    with s.db.transaction() as session:
        auth = pull_auth(session, s.fleet.key)
    prepared = PackageRequest(
        models=models_from_registry(s.registry, list(body.models)),
        config=body.inference_config(),
        profiles=list(body.profiles),
        name=body.name,
        version=body.version,
        registry=body.registry,
        repository=body.repository,
        smoke=body.smoke,
        push=body.push,
        pull_auth=auth,
    )
    check_request(prepared)
    return prepared


async def create_package(request: web.Request) -> web.Response:
    """Check the request, then queue a packaging job (202; follow it at ``Location``)."""
    body = await json_body(request, PackageBody)
    prepared = await call(_prepare, request, body)
    cache_dir = services(request).settings.data_dir / "packaging"
    job = request.app[jobs_key].submit(body, prepared, cache_dir)
    return reply(job, 202, {"Location": f"/packages/{job.id}"})


async def list_packages(request: web.Request) -> web.Response:
    """Packaging jobs of this server process, newest first."""
    jobs = request.app[jobs_key]
    ordered = sorted(jobs.jobs.values(), key=lambda j: j.created_at, reverse=True)
    return reply([j.model_copy(update={"log": []}) for j in ordered])


async def show_package(request: web.Request) -> web.Response:
    """One packaging job with its log lines and results."""
    return reply(request.app[jobs_key].view(request.match_info["id"]))


ROUTES = (
    Route(
        "POST",
        "/packages",
        create_package,
        "Package registered models into module images (background job)",
        "packages",
        response=PackageJob,
        status=202,
        body=Body({"application/json": {"schema": PackageBody}}),
        errors=(400, 404, 415),
    ),
    Route(
        "GET",
        "/packages",
        list_packages,
        "List packaging jobs (without their logs)",
        "packages",
        response=list[PackageJob],
    ),
    Route(
        "GET",
        "/packages/{id}",
        show_package,
        "Show a packaging job: state, log, images by digest",
        "packages",
        response=PackageJob,
        errors=(404,),
    ),
)
