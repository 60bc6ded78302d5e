"""``/ui/events``: server-sent events that keep a page's live regions current.

The stream names a view and what it shows (``view=devices&ids=a,b,c``; ``view=device&key=ID``).
It sends every region once, then waits for the store watcher; after each change (and at least
every ``REFRESH_S``, for devices going stale as time passes) it computes the view's regions
again and sends only those whose HTML changed, as ``event: fragment`` with
``{"id": element id, "html": ...}``. A view that no longer exists ends the stream with
``event: gone``; an unexpected failure (logged) with ``event: failed``, and the page reconnects.
At most one recompute per ``MIN_GAP_S`` per stream: with a fleet reporting continuously, a page
is updated about once a second, never once per report.

Streams of the same view share one computation per store version (``SharedRegions``): ten
operators on the overview of a 10,000-device fleet cost the server one overview per change, not
ten. Only the device view differs per session (its forms carry the session's CSRF token).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from cloud.api.errors import ApiError
from cloud.api.routing import call, services
from cloud.dashboard.regions import DEVICE_ID_RE, MAX_LIVE_ROWS, LiveView, Regions, live_regions
from cloud.dashboard.session import Session
from cloud.dashboard.web import env_key, handler, sessions_key, watcher
from cloud.store.errors import NotFoundError

log = logging.getLogger(__name__)

REFRESH_S = 5.0
MIN_GAP_S = 0.75
VIEWS = ("overview", "devices", "device", "deployments", "deployment")
MAX_SHARED = 1000
"""Views kept in ``SharedRegions`` before the ones computed longest ago are dropped."""

Key = tuple[LiveView, str]


class SharedRegions:
    """The latest regions of each view, computed once per store version for every stream showing it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._entries: dict[Key, tuple[int, float, Regions]] = {}
        self._locks: dict[Key, asyncio.Lock] = {}

    async def get(self, key: Key, version: int, compute: Callable[[], Awaitable[Regions]]) -> Regions:
        """The regions of ``key`` at store ``version`` (at most ``REFRESH_S`` old), computing them once."""
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] == version and self.clock() - entry[1] < REFRESH_S:
                return entry[2]
            regions = await compute()
            self._entries[key] = (version, self.clock(), regions)
        if len(self._entries) > MAX_SHARED:
            oldest = sorted(self._entries, key=lambda k: self._entries[k][1])[
                : len(self._entries) - MAX_SHARED
            ]
            for k in oldest:
                self._entries.pop(k, None)
                self._locks.pop(k, None)
        return regions


shared_key = web.AppKey("dashboard_shared_regions", SharedRegions)


def parse_live(request: web.Request) -> LiveView:
    """The view a stream asks for; 400 naming what is wrong."""
    view = request.query.get("view", "")
    if view not in VIEWS:
        raise ApiError(400, f"view {view!r}: expected one of {', '.join(VIEWS)}")
    ids = tuple(i for i in request.query.get("ids", "").split(",") if i)
    if len(ids) > MAX_LIVE_ROWS or not all(DEVICE_ID_RE.match(i) for i in ids):
        raise ApiError(400, f"ids: at most {MAX_LIVE_ROWS} device ids, separated by commas")
    key = request.query.get("key", "")
    if view in ("device", "deployment") and not key:
        raise ApiError(400, f"view {view} needs key=")
    return LiveView(view, key, ids)


@handler("stream")
async def events(request: web.Request, session: Session) -> web.StreamResponse:
    """The live stream of one page; see the module docstring."""
    live = parse_live(request)
    s, watch, env = services(request), watcher(request), request.app[env_key]
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "X-Accel-Buffering": "no"})
    await response.prepare(request)
    await response.write(b"retry: 2000\n\n")
    sent: dict[str, str] = {}
    version = watch.version
    sessions, shared = request.app[sessions_key], request.app[shared_key]
    key = (live, session.csrf if live.view == "device" else "")

    async def compute() -> Regions:
        return await call(live_regions, env, s, watch, live, session.csrf)

    try:
        computed_at = -MIN_GAP_S
        while sessions.get(session.id) is not None:
            await asyncio.sleep(max(0.0, computed_at + MIN_GAP_S - time.monotonic()))
            computed_at = time.monotonic()
            try:
                regions = await shared.get(key, version, compute)
            except NotFoundError as e:
                await response.write(
                    b"event: gone\ndata: " + json.dumps({"error": str(e)}).encode() + b"\n\n"
                )
                break
            except Exception as e:
                # The stream's headers went out already: an error answer cannot follow them.
                # Say so on the stream and end it; the page reconnects (``retry``).
                log.exception("dashboard live view %s failed", live.view)
                await response.write(
                    b"event: failed\ndata: "
                    + json.dumps({"error": f"live update failed: {type(e).__name__}"}).encode()
                    + b"\n\n"
                )
                break
            chunks = []
            for element_id, html in regions.items():
                if sent.get(element_id) != html:
                    sent[element_id] = str(html)
                    data = json.dumps({"id": element_id, "html": str(html)})
                    chunks.append(f"event: fragment\ndata: {data}\n\n")
            chunks.append(": tick\n\n")
            await response.write("".join(chunks).encode())
            version = await watch.wait(version, REFRESH_S)
    except ConnectionResetError:
        pass  # the page was closed
    return response
