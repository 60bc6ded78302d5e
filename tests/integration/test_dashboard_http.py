"""The dashboard's HTTP contract on a real aiohttp server and SQLite store (no browser needed).

Login for a session cookie (the token never in a URL, a cookie or the page), CSRF and origin
checks on every POST, the security headers, the REST API's token check untouched by the
session, the devices page's filters, sort and pagination answered from the store, and
``--no-dashboard``. The browser tests (``test_dashboard.py``) cover the pages against a live fleet.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from cloud.api import Services, create_app
from cloud.api.auth import Tokens
from cloud.config import resolve_settings
from edgemqtt.endpoint import Endpoint
from tests.integration import test_store_postgres
from tests.services import free_port

pytestmark = pytest.mark.integration

TOKEN = "dashboard-http-token-0123456789"
postgres = test_store_postgres.postgres
fresh_database = test_store_postgres.db_url
"""The store tests' PostgreSQL server and a fresh database on it (pytest names a fixture by the
module attribute that holds it)."""


async def _client(
    tmp_path: Path, dashboard: bool = True, database: str | None = None
) -> AsyncIterator[TestClient]:
    services = Services.open(
        resolve_settings(tmp_path / "data", database, env={}),
        Endpoint.parse(f"mqtt://127.0.0.1:{free_port()}"),
    )
    app = create_app(services, Tokens((TOKEN.encode(),), "test"), dashboard=dashboard)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client


@pytest.fixture
async def client(tmp_path: Path) -> AsyncIterator[TestClient]:
    async for c in _client(tmp_path):
        yield c


def _origin(client: TestClient) -> dict[str, str]:
    return {"Origin": str(client.make_url("")).rstrip("/")}


async def _login_form(client: TestClient) -> str:
    async with client.get("/ui/login") as r:
        assert r.status == 200
        match = re.search(r'name="csrf" value="([0-9a-f]+)"', await r.text())
        assert match
        return match.group(1)


async def login(client: TestClient) -> str:
    """Log in; returns the session's CSRF token (read from a page, as the browser does)."""
    csrf = await _login_form(client)
    async with client.post(
        "/ui/login", data={"csrf": csrf, "token": TOKEN}, headers=_origin(client), allow_redirects=False
    ) as r:
        assert r.status == 303 and r.headers["Location"] == "/ui/"
        cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and TOKEN not in cookie
    async with client.get("/ui/") as r:
        assert r.status == 200
        match = re.search(r'data-csrf="([^"]+)"', await r.text())
        assert match
        return match.group(1)


async def test_pages_need_a_session_and_carry_security_headers(client: TestClient) -> None:
    async with client.get("/", allow_redirects=False) as r:
        assert (r.status, r.headers["Location"]) == (303, "/ui/")
    async with client.get("/ui/devices", allow_redirects=False) as r:
        assert (r.status, r.headers["Location"]) == (303, "/ui/login")
    # The API's bearer token is not a dashboard session.
    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with client.get("/ui/devices", headers=auth, allow_redirects=False) as r:
        assert r.status == 303
    async with client.get("/ui/events?view=overview") as r:
        assert r.status == 401 and "log in" in (await r.json())["error"]
    async with client.get("/ui/login") as r:
        csp = r.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "unsafe-eval" not in csp
        assert "frame-ancestors 'none'" in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Cache-Control"] == "no-store"
    async with client.get("/ui/static/dashboard.js") as r:
        assert r.status == 200 and "EventSource" in await r.text()
        assert r.headers["X-Content-Type-Options"] == "nosniff"


async def test_login_refuses_bad_tokens_forms_and_origins(client: TestClient) -> None:
    csrf = await _login_form(client)
    async with client.post(
        "/ui/login", data={"csrf": csrf, "token": "wrong-token-0123456789"}, headers=_origin(client)
    ) as r:
        assert r.status == 401
        assert "wrong-token" not in await r.text()
    async with client.post(
        "/ui/login", data={"csrf": "forged", "token": TOKEN}, headers=_origin(client)
    ) as r:
        assert r.status == 403
    async with client.post(  # a token that is not ASCII is refused like any other (no 500)
        "/ui/login", data={"csrf": "f\u00f6rged-\u2603", "token": TOKEN}, headers=_origin(client)
    ) as r:
        assert r.status == 403
    csrf = await _login_form(client)
    async with client.post(
        "/ui/login", data={"csrf": csrf, "token": TOKEN}, headers={"Origin": "http://evil.example"}
    ) as r:
        assert r.status == 403
    async with client.get(f"/ui/login?token={TOKEN}", allow_redirects=False) as r:
        assert r.status == 200 and "edge_session" not in r.headers.get("Set-Cookie", "")


async def test_posts_need_the_csrf_token_and_our_origin(client: TestClient) -> None:
    csrf = await login(client)
    async with client.post(
        "/ui/deployments/nope/resume", data={"csrf": "wrong"}, headers=_origin(client)
    ) as r:
        assert r.status == 403 and "CSRF" in await r.text()
    async with client.post("/ui/deployments/nope/resume", data={"csrf": csrf}) as r:
        assert r.status == 403  # no Origin or Referer
    async with client.post(
        "/ui/deployments/nope/resume", data={"csrf": csrf}, headers={"Origin": "http://evil.example"}
    ) as r:
        assert r.status == 403
    async with client.post(
        "/ui/deployments/nope/resume", data={"csrf": csrf}, headers=_origin(client), allow_redirects=False
    ) as r:
        assert (r.status, r.headers["Location"]) == (303, "/ui/deployments/nope")
    async with client.get("/ui/deployments") as r:
        assert "resume nope: deployment &#39;nope&#39; does not exist" in await r.text()
    async with client.post(
        "/ui/logout", data={"csrf": csrf}, headers=_origin(client), allow_redirects=False
    ) as r:
        assert (r.status, r.headers["Location"]) == (303, "/ui/login")
    async with client.get("/ui/", allow_redirects=False) as r:
        assert r.status == 303


async def test_the_session_does_not_open_the_rest_api(client: TestClient) -> None:
    await login(client)
    async with client.get("/devices") as r:
        assert r.status == 401


async def test_devices_page_filters_sorts_and_pages_in_the_store(client: TestClient) -> None:
    await _devices_page(client)


async def test_devices_page_on_postgresql(tmp_path: Path, fresh_database: str) -> None:
    async for client in _client(tmp_path, database=fresh_database):
        await _devices_page(client)


async def _devices_page(client: TestClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    for i in range(60):
        body = {
            "id": f"pump-{i:03d}",
            "profile": "cuda" if i % 3 == 0 else "cpu",
            "tags": {"site": f"s{i % 2}"},
        }
        async with client.post("/devices", json=body, headers=auth) as r:
            assert r.status == 201, await r.text()
    await login(client)

    async def rows(query: str) -> tuple[list[str], str]:
        async with client.get(f"/ui/devices{query}") as r:
            html = await r.text()
            assert r.status == 200, html
            return re.findall(r'<tr id="row-([^"]+)"', html), html

    page1, html = await rows("")
    assert page1 == [f"pump-{i:03d}" for i in range(50)] and "60 matching" in html and "page 1 of 2" in html
    assert (await rows("?page=2"))[0] == [f"pump-{i:03d}" for i in range(50, 60)]
    assert (await rows("?sort=id&desc=1"))[0][0] == "pump-059"
    cuda = (await rows("?profile=cuda"))[0]
    assert cuda == [f"pump-{i:03d}" for i in range(0, 60, 3)]
    both = (await rows("?profile=cuda&tag=site%3Ds1"))[0]
    assert both == [f"pump-{i:03d}" for i in range(0, 60, 3) if i % 2 == 1]
    assert (await rows("?q=p-01"))[0] == [f"pump-{i:03d}" for i in range(10, 20)]
    assert (await rows("?q=%25"))[0] == []  # LIKE wildcards are searched for literally
    assert len((await rows("?status=never+seen"))[0]) == 50
    assert (await rows("?status=online"))[0] == []
    assert len((await rows("?status=never+seen&sort=last_seen&page=2"))[0]) == 10
    async with client.get("/ui/devices?status=asleep") as r:
        assert r.status == 400 and "expected one of" in await r.text()
    async with client.get("/ui/devices/pump-000") as r:
        assert r.status == 200 and "never connected" in await r.text()
    async with client.get("/ui/devices/ghost") as r:
        assert r.status == 404


async def test_no_dashboard_leaves_only_the_api(tmp_path: Path) -> None:
    async for client in _client(tmp_path, dashboard=False):
        async with client.get("/ui/") as r:
            assert r.status == 401
        async with client.get("/") as r:
            assert r.status == 401
