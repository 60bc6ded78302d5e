"""The live regions of each page: element id → HTML, from the same partial templates as the page.

A page is rendered with its regions; ``/ui/events`` computes the same regions again when the store
changes and sends those whose HTML differs from what the browser has. Each function here is
blocking (it reads the store) and runs off the event loop; each reads only what its page shows
(the devices page: the rows on screen, never the whole fleet).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from markupsafe import Markup

from cloud.api.context import Services
from cloud.dashboard.queries import device_rows, overview, recent_events
from cloud.dashboard.watch import Watcher
from cloud.fleet.device_state import device_states
from cloud.store.errors import NotFoundError
from modules.contract import utcnow

DEVICE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
MAX_LIVE_ROWS = 200
DEPLOYMENT_ROWS = 200
"""Devices listed on a deployment's page (the devices page, filtered by deployment, has them all)."""

Regions = dict[str, Markup]


@dataclass(frozen=True)
class LiveView:
    """What a page watches: its view name and the few keys it needs (ids on screen, a name)."""

    view: str
    key: str = ""
    ids: tuple[str, ...] = ()


def _part(env: jinja2.Environment, name: str, **context: Any) -> Markup:
    # The partial is an autoescaped template: its output is HTML whose every value was escaped.
    return Markup(env.get_template(f"parts/{name}.html").render(**context))


def overview_regions(env: jinja2.Environment, s: Services, watcher: Watcher) -> Regions:
    """Counts, deployments in progress and recent events."""
    with s.db.transaction() as session:
        counts = overview(session, utcnow())
        events = recent_events(session)
    deployments = s.fleet.list_deployments()
    history = {name: list(samples) for name, samples in watcher.history.items()}
    return {
        "ov-counts": _part(env, "overview_counts", o=counts),
        "ov-deployments": _part(env, "overview_deployments", deployments=deployments, history=history),
        "ov-events": _part(env, "overview_events", events=events),
    }


def device_list_regions(env: jinja2.Environment, s: Services, ids: tuple[str, ...]) -> Regions:
    """One row per device on screen."""
    with s.db.transaction() as session:
        rows = device_rows(session, list(ids[:MAX_LIVE_ROWS]), utcnow())
    return {f"row-{r.id}": _part(env, "device_row", r=r) for r in rows}


def device_regions(
    env: jinja2.Environment, s: Services, watcher: Watcher, device_id: str, csrf: str
) -> Regions:
    """A device's status and online history, modules (with the session's CSRF token in their forms)
    and system metrics."""
    view = s.devices.show(device_id)
    with s.db.transaction() as session:
        state = device_states(session, [device_id], utcnow())[device_id]
    return {
        "device-summary": _part(env, "device_summary", d=view, st=state),
        "device-history": _part(env, "device_history", changes=watcher.presence.history(device_id)),
        "device-modules": _part(env, "device_modules", d=view, st=state, csrf=csrf),
        "device-system": _part(env, "device_system", st=state),
    }


def deployments_regions(env: jinja2.Environment, s: Services, watcher: Watcher) -> Regions:
    """The deployments table."""
    history = {name: list(samples) for name, samples in watcher.history.items()}
    return {
        "deployments-table": _part(
            env, "deployments_table", deployments=s.fleet.list_deployments(), history=history
        )
    }


def deployment_regions(env: jinja2.Environment, s: Services, watcher: Watcher, name: str) -> Regions:
    """A deployment's rollout state, waves, sparkline and (the first) devices."""
    progress = s.fleet.progress(name)
    samples = list(watcher.history.get(name, ()))
    return {
        "dep-rollout": _part(env, "deployment_rollout", p=progress, samples=samples),
        "dep-devices": _part(env, "deployment_devices", p=progress, limit=DEPLOYMENT_ROWS),
    }


def live_regions(
    env: jinja2.Environment, s: Services, watcher: Watcher, live: LiveView, csrf: str
) -> Regions:
    """The regions of ``live``'s page; NotFoundError when what it shows is gone."""
    makers: Mapping[str, Callable[[], Regions]] = {
        "overview": lambda: overview_regions(env, s, watcher),
        "devices": lambda: device_list_regions(env, s, live.ids),
        "device": lambda: device_regions(env, s, watcher, live.key, csrf),
        "deployments": lambda: deployments_regions(env, s, watcher),
        "deployment": lambda: deployment_regions(env, s, watcher, live.key),
    }
    maker = makers.get(live.view)
    if maker is None:
        raise NotFoundError(f"no live view {live.view!r}")
    return maker()
