"""The dashboard's pages: overview, devices, a device, deployments, a deployment, models.

Each page reads the store off the event loop through the same operations as ``edgectl`` and the
REST API, renders its live regions (``regions.py``) with it, and names in ``data-events`` the
``/ui/events`` stream that keeps those regions current.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

import yaml
from aiohttp import web

from cloud import continuous
from cloud.api.errors import ApiError
from cloud.api.routing import call, services
from cloud.dashboard.packages import model_packages
from cloud.dashboard.queries import (
    DEPLOYMENT_STATUSES,
    PRESENCES,
    SORTS,
    DeviceFilter,
    FilterError,
    device_page,
    known_values,
)
from cloud.dashboard.regions import (
    LiveView,
    Regions,
    deployment_regions,
    deployments_regions,
    device_list_regions,
    device_regions,
    overview_regions,
)
from cloud.dashboard.session import Session
from cloud.dashboard.web import PREFIX, env_key, handler, render, watcher
from modules.contract import utcnow


def events_url(live: LiveView) -> str:
    """The ``/ui/events`` URL of a live view."""
    query: dict[str, str] = {"view": live.view}
    if live.key:
        query["key"] = live.key
    if live.ids:
        query["ids"] = ",".join(live.ids)
    return f"{PREFIX}/events?{urlencode(query)}"


def _page(
    request: web.Request, template: str, live: LiveView, regions: Regions, **context: Any
) -> web.Response:
    return render(request, template, events=events_url(live), regions=regions, **context)


@handler("page")
async def overview_page(request: web.Request, _session: Session) -> web.StreamResponse:
    """Devices by presence and status, deployments in progress, recent events."""
    regions = await call(overview_regions, request.app[env_key], services(request), watcher(request))
    return _page(request, "overview.html", LiveView("overview"), regions, title="Overview")


def _filter(request: web.Request) -> DeviceFilter:
    q = request.query
    try:
        page = int(q.get("page", "1"))
        sort = q.get("sort", "id")
        return DeviceFilter(
            q=q.get("q", "").strip()[:64],
            tag=q.get("tag", "").strip(),
            profile=q.get("profile", "").strip(),
            status=q.get("status", "").strip(),
            deployment=q.get("deployment", "").strip(),
            sort=sort,  # type: ignore[arg-type]  # checked below
            desc=q.get("desc", "") in ("1", "true"),
            page=page,
        ).check()
    except (ValueError, FilterError) as e:
        raise ApiError(400, f"devices page: {e}") from None


def _query_link(f: DeviceFilter, **change: Any) -> str:
    values = {
        "q": f.q,
        "tag": f.tag,
        "profile": f.profile,
        "status": f.status,
        "deployment": f.deployment,
        "sort": f.sort,
        "desc": "1" if f.desc else "",
        "page": str(f.page),
    }
    values.update({k: str(v) for k, v in change.items()})
    defaults = {"sort": "id", "page": "1"}
    return f"{PREFIX}/devices?" + urlencode({k: v for k, v in values.items() if v and v != defaults.get(k)})


@handler("page")
async def devices_page(request: web.Request, _session: Session) -> web.StreamResponse:
    """One page of devices: search, filters, sort; the rows on screen stay live."""
    s = services(request)
    f = _filter(request)

    def read() -> tuple[Any, list[str], list[str]]:
        with s.db.transaction() as session:
            return device_page(session, f, utcnow()), *known_values(session)

    page, profiles, deployments = await call(read)
    ids = tuple(r.id for r in page.rows)
    regions = await call(device_list_regions, request.app[env_key], s, ids)
    return _page(
        request,
        "devices.html",
        LiveView("devices", ids=ids),
        regions,
        title="Devices",
        page=page,
        f=f,
        profiles=profiles,
        deployments=deployments,
        statuses=(*PRESENCES, *DEPLOYMENT_STATUSES, "failing"),
        sorts=SORTS,
        link=lambda **change: _query_link(f, **change),
    )


@handler("page")
async def device_page_view(request: web.Request, session: Session) -> web.StreamResponse:
    """A device: status, modules (logs, restart), system metrics, last rejection."""
    device_id = request.match_info["id"]
    regions = await call(
        device_regions, request.app[env_key], services(request), watcher(request), device_id, session.csrf
    )
    return _page(
        request,
        "device.html",
        LiveView("device", key=device_id),
        regions,
        title=device_id,
        device_id=device_id,
    )


@handler("page")
async def deployments_page(request: web.Request, _session: Session) -> web.StreamResponse:
    """Every deployment with its rollout state and counts."""
    regions = await call(deployments_regions, request.app[env_key], services(request), watcher(request))
    return _page(request, "deployments.html", LiveView("deployments"), regions, title="Deployments")


@handler("page")
async def deployment_page(request: web.Request, _session: Session) -> web.StreamResponse:
    """A deployment: waves, devices, halt reason, actions, the manifest as YAML."""
    s = services(request)
    name = request.match_info["name"]
    regions = await call(deployment_regions, request.app[env_key], s, watcher(request), name)
    document = await call(continuous.deployment_document, s.fleet, name)
    manifest = yaml.safe_dump(document.manifest.model_dump(mode="json"), sort_keys=False)
    history = await call(s.fleet.history, name)
    return _page(
        request,
        "deployment.html",
        LiveView("deployment", key=name),
        regions,
        title=name,
        name=name,
        document=document,
        manifest_yaml=manifest,
        revisions=history,
    )


@handler("page")
async def models_page(request: web.Request, _session: Session) -> web.StreamResponse:
    """Model versions with their tags and files, and the packaged images per profile."""
    s = services(request)
    versions = await call(s.registry.list_versions)
    packages = await call(model_packages, request.app, s)
    return render(request, "models.html", title="Models", versions=versions, packages=packages)
