"""The models page's packages: module images per profile, with digests and sizes where known.

Two sources: packaging jobs this server ran (``POST /packages``; they hold each image's digest
and its layer sizes, and are forgotten on restart) and the images deployments name per profile
for the model versions they use (digests as the manifests pin them; sizes are not in the store).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from aiohttp import web

from cloud.api.context import Services
from cloud.api.routes_packages import jobs_key


@dataclass(frozen=True)
class PackageRow:
    """One module image for one profile."""

    models: str
    """``name:version`` of the model(s) inside."""
    module: str
    profile: str
    image: str
    size: int | None
    """Bytes of the layers above the base image (None: unknown)."""
    source: str
    at: datetime | None = None

    @property
    def digest(self) -> str:
        """The image's ``sha256:`` digest when its reference pins one, else empty."""
        return self.image.partition("@")[2]


def model_packages(app: web.Application, s: Services) -> list[PackageRow]:
    """Packaged images from this server's jobs, then the images deployments use, by model."""
    rows: list[PackageRow] = []
    jobs = app.get(jobs_key)
    # A snapshot: this runs in a worker thread while the loop may add jobs.
    for job in list(jobs.jobs.values()) if jobs is not None else ():
        if job.state != "succeeded":
            continue
        for r in job.results:
            rows.append(
                PackageRow(
                    models=", ".join(job.request.models),
                    module=r.module,
                    profile=r.profile,
                    image=r.image or r.local_tag or "-",
                    size=sum(layer.size for layer in r.layers),
                    source=f"packaging job {job.id}",
                    at=job.finished_at,
                )
            )
    for summary in s.fleet.list_deployments():
        if not summary.models:
            continue
        manifest, _ = s.fleet.manifest(summary.name)
        for module, spec in sorted(manifest.modules.items()):
            for profile, image in sorted(spec.images.items()):
                rows.append(
                    PackageRow(
                        models=", ".join(summary.models),
                        module=module,
                        profile=profile,
                        image=str(image),
                        size=None,
                        source=f"deployment {summary.name}",
                        at=summary.updated_at,
                    )
                )
    rows.sort(key=lambda r: (r.models, r.module, r.profile))
    return rows
