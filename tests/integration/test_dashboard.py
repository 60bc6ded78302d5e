"""The dashboard in a real browser (Debian's chromium driven by Playwright) against a real fleet.

One ``edgectl serve`` (controller on) over a SQLite data dir and the session's Mosquitto; its
store is filled by real simulated fleets (``edgectl simulate --provision`` subprocesses) and one
hostile device (a plain MQTT client that reports ``<img src=x onerror=...>`` in its reason, its
module message, its agent version and its log lines). The tests run in file order and share the
fleet and one logged-in browser page: log in, watch devices turn healthy, read a device's
modules, tail a log, restart a module, watch rollout waves advance, see a halted rollout's
reason, see a device go offline, and check that nothing a device wrote runs as script. Every wait
is for something to appear on the page (generous timeouts; no timing is asserted). A screenshot
of each view goes to ``.work/artefacts/dashboard/``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
import yaml
from paho.mqtt.enums import CallbackAPIVersion

from modules.contract import CommandRequest, CommandResponse, ModuleStatus, OnlineStatus, ReportedState
from tests.services import REPO_ROOT, MosquittoBroker, free_port, http_status, log_tail, wait_until

pytestmark = pytest.mark.integration

TOKEN = "dashboard-test-token-0123456789"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTEFACTS = REPO_ROOT / ".work" / "artefacts" / "dashboard"
START_S = 60.0
WAIT_MS = 60_000
HOSTILE = '<img src=x onerror="window.__pwned=1">'
HOSTILE_LOG = ["model loaded", HOSTILE, "<script>window.__pwned=2</script>", '"quoted" & <b>bold</b>']
SIM_DEVICES = [f"sim-{i:05d}" for i in range(1, 7)]
BAD_DEVICES = ["bad-00001", "bad-00002"]
GONE = "gone-00001"
EVIL = "evil-1"
PAGE_ERRORS: list[str] = []
"""Uncaught script errors of the page (there must be none)."""


def _manifest(name: str, devices: list[str], **extra: Any) -> str:
    doc: dict[str, Any] = {
        "name": name,
        "target": {"device_ids": devices},
        "modules": {"det": {"images": {"cpu": "127.0.0.1:5000/det:1-cpu"}}},
        "health_deadline_s": 4,
        **extra,
    }
    return yaml.safe_dump(doc)


class HostileDevice:
    """A device that writes markup where operators read text: reason, messages, logs."""

    def __init__(self, broker: MosquittoBroker) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=EVIL)
        self.client.username_pw_set(EVIL)
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *_: c.subscribe(f"edge/{EVIL}/cmd/req/+", qos=1)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def report(self) -> None:
        online = OnlineStatus(online=True, session=1)
        self.client.publish(f"edge/{EVIL}/online", online.model_dump_json(), qos=1, retain=True)
        report = ReportedState(
            device_id=EVIL,
            deployment_status="failed",
            reason=f"module det failed: {HOSTILE}",
            modules={"det": ModuleStatus(runtime_status="failed", exit_code=1, message=HOSTILE)},
            agent_version=HOSTILE,
            heartbeat_s=3600,
        )
        self.client.publish(f"edge/{EVIL}/reported", report.model_dump_json(), qos=1, retain=True)

    def _on_message(self, client: mqtt.Client, _u: object, message: mqtt.MQTTMessage) -> None:
        request = CommandRequest.model_validate_json(message.payload)
        response = CommandResponse(id=request.id, ok=True, output="\n".join(HOSTILE_LOG))
        client.publish(f"edge/{EVIL}/cmd/res/{request.id}", response.model_dump_json(), qos=1)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@dataclass
class Rig:
    """The server, the fleets and the broker; ``api`` calls the REST API with the token."""

    url: str
    data_dir: Path
    broker: MosquittoBroker
    procs: dict[str, subprocess.Popen[str]] = field(default_factory=dict)
    logs: dict[str, Path] = field(default_factory=dict)

    def start(self, name: str, *args: str) -> None:
        log = self.data_dir.parent / f"{name}.log"
        self.logs[name] = log
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "cloud.cli", *args, "--data-dir", str(self.data_dir)],
            cwd=REPO_ROOT,
            env={**os.environ, "EDGE_DB_URL": "", "EDGE_API_TOKEN": TOKEN},
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            text=True,
        )

    def simulate(self, name: str, prefix: str, devices: int, *extra: str) -> None:
        self.start(
            name,
            "simulate",
            "--devices",
            str(devices),
            "--prefix",
            prefix,
            "--provision",
            "--broker",
            f"mqtt://{self.broker.host}:{self.broker.port}",
            "--heartbeat",
            "2",
            "--pull-s",
            "0.1-0.3",
            "--ready-s",
            "1-2",
            "--processes",
            "1",
            "--quiet",
            *extra,
        )

    def api(
        self, method: str, path: str, body: str | bytes | None = None, media: str = "application/yaml"
    ) -> Any:
        request = urllib.request.Request(
            self.url + path,
            data=body.encode() if isinstance(body, str) else body,
            method=method,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": media},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    def stop(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> str:
        for name in reversed(list(self.procs)):
            self.stop(name)
        return "\n".join(f"--- {n}\n{log_tail(p, 20)}" for n, p in self.logs.items())


@pytest.fixture(scope="module")
def rig(mosquitto: MosquittoBroker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """``edgectl serve`` with its controller, three simulated fleets and a hostile device."""
    data_dir = tmp_path_factory.mktemp("dashboard") / "data"
    port = free_port()
    r = Rig(f"http://127.0.0.1:{port}", data_dir, mosquitto)
    r.start(
        "serve",
        "serve",
        "--port",
        str(port),
        "--broker",
        f"mqtt://{mosquitto.host}:{mosquitto.port}",
        "--interval",
        "0.3",
    )
    hostile: HostileDevice | None = None
    try:
        if not wait_until(
            lambda: http_status(f"{r.url}/healthz") == 200, START_S, lambda: r.procs["serve"].poll() is None
        ):
            pytest.fail(f"edgectl serve did not start:\n{r.close()}")
        r.simulate("fleet", "sim-", len(SIM_DEVICES))
        r.simulate("bad", "bad-", len(BAD_DEVICES), "--failure-rate", "1")
        r.simulate("gone", "gone-", 1)
        r.start("evil", "device", "add", EVIL, "--tag", "site=evil")
        r.procs["evil"].wait(timeout=60)
        assert r.procs["evil"].returncode == 0, log_tail(r.logs["evil"])
        hostile = HostileDevice(mosquitto)
        hostile.report()
        yield r
    finally:
        if hostile is not None:
            hostile.close()
        r.close()


@pytest.fixture(scope="module")
def page() -> Iterator[Any]:
    """A chromium page (headless); skips loudly when Playwright or chromium cannot start (before the
    tests start the fleet: they ask for it first)."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        pytest.skip(
            f"BROWSER TESTS SKIPPED: playwright is not installed ({e}); run: bash scripts/bootstrap.sh"
        )
    if not Path(CHROMIUM).exists():
        pytest.skip(
            f"BROWSER TESTS SKIPPED: {CHROMIUM} is missing; install Debian's chromium (scripts/bootstrap.sh)"
        )
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        except PlaywrightError as e:
            pytest.skip(f"BROWSER TESTS SKIPPED: chromium did not start under Playwright: {e}")
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        p = context.new_page()
        p.set_default_timeout(WAIT_MS)
        p.on("dialog", lambda d: d.accept())
        p.on("pageerror", lambda e: PAGE_ERRORS.append(str(e)))
        yield p
        context.close()
        browser.close()


def shot(page: Any, name: str) -> None:
    """Save a screenshot of the current view as a test artefact."""
    page.screenshot(path=str(ARTEFACTS / f"{name}.png"), full_page=True)


def until(page: Any, expression: str, timeout_s: float = WAIT_MS / 1000) -> None:
    """Wait until a JavaScript expression is true in the page.

    Polled with ``page.evaluate`` (the DevTools protocol, which the page's Content-Security-Policy
    does not govern): ``wait_for_function`` compiles its predicate in the page, which the CSP
    (no ``unsafe-eval``) rightly refuses.
    """
    if not wait_until(lambda: bool(page.evaluate(expression)), timeout_s):
        pytest.fail(f"the page never showed: {expression}")


def no_script_ran(page: Any) -> None:
    """Nothing a device wrote became an element or ran (the flag its markup would set is unset)."""
    assert page.evaluate("window.__pwned") is None
    assert page.locator("img").count() == 0
    assert page.locator("main script").count() == 0


# ---- the tests, in order ------------------------------------------------------------------------


def test_login_with_the_operator_token(page: Any, rig: Rig) -> None:
    page.goto(f"{rig.url}/ui/devices")
    assert page.url.endswith("/ui/login")
    shot(page, "login")
    page.fill("#token", "not-the-token-at-all")
    page.click("#login")
    assert "not one of this server's operator tokens" in page.inner_text("main")
    page.fill("#token", TOKEN)
    page.click("#login")
    page.wait_for_url(re.compile(r"/ui/$"))
    cookies = {c["name"]: c for c in page.context.cookies()}
    session = cookies["edge_session"]
    assert session["httpOnly"] and session["sameSite"] == "Strict"
    assert TOKEN not in page.url and TOKEN not in page.content()
    assert TOKEN not in rig.logs["serve"].read_text()


def test_devices_turn_healthy_without_reload(page: Any, rig: Rig) -> None:
    page.goto(f"{rig.url}/ui/devices?q=sim-")
    rows = page.locator("#devices tbody tr[data-device]")
    rows.first.wait_for()
    until(page, f"document.querySelectorAll('#devices tr[data-device]').length === {len(SIM_DEVICES)}")
    page.evaluate("window.__sameDocument = true")
    modules = "[...document.querySelectorAll('#devices tr[data-device] [data-field=modules]')]"
    assert page.evaluate(f"{modules}.map(c => c.textContent)") == ["0/0"] * len(SIM_DEVICES)
    rig.api("POST", "/deployments", _manifest("vision", SIM_DEVICES))
    rig.api(
        "POST",
        "/deployments",
        _manifest("broken", BAD_DEVICES, rollout={"waves": [1, 1], "max_failure_ratio": 0}),
    )
    until(
        page,
        "[...document.querySelectorAll('#devices tr[data-device]')]"
        ".every(r => r.dataset.status === 'healthy'"
        " && r.querySelector('[data-field=modules]').textContent === '1/1')",
    )
    assert page.evaluate("window.__sameDocument") is True  # updated in place, never reloaded
    assert page.locator("#live").get_attribute("data-state") == "on"
    shot(page, "devices")


def test_device_page_shows_module_status(page: Any, rig: Rig) -> None:
    device = SIM_DEVICES[0]
    page.goto(f"{rig.url}/ui/devices/{device}")
    until(
        page, "document.querySelector('tr[data-module=det] [data-field=runtime]').textContent === 'running'"
    )
    row = page.locator("tr[data-module=det]")
    assert "CPUExecutionProvider" in row.inner_text()
    assert page.locator("#deployment-status").inner_text() == "healthy"
    assert page.locator("#presence").inner_text() == "online"
    shot(page, "device")


def test_log_tail_over_the_command_topics(page: Any, rig: Rig) -> None:
    page.goto(f"{rig.url}/ui/devices/{SIM_DEVICES[0]}")
    page.click("button.show-logs[data-module=det]")
    until(page, "document.getElementById('log-lines').textContent.includes('simulated module det')")
    assert SIM_DEVICES[0] in page.inner_text("#log-lines")


def test_restart_raises_the_restart_count(page: Any, rig: Rig) -> None:
    page.goto(f"{rig.url}/ui/devices/{SIM_DEVICES[1]}")
    before = int(page.inner_text("tr[data-module=det] [data-field=restarts]"))
    page.click("tr[data-module=det] button.restart")
    page.wait_for_url(re.compile(rf"/ui/devices/{SIM_DEVICES[1]}$"))
    assert "module det restarted" in page.inner_text(".flash.ok")
    until(
        page,
        f"Number(document.querySelector('tr[data-module=det] [data-field=restarts]').textContent) > {before}",
    )


def test_rollout_waves_advance_live(page: Any, rig: Rig) -> None:
    page.goto(f"{rig.url}/ui/deployments/vision")
    assert page.locator("#rollout-state").inner_text() == "complete"
    revision = _manifest(
        "vision",
        SIM_DEVICES,
        rollout={"waves": [2, 2, 2], "max_failure_ratio": 0.5},
        modules={"det": {"images": {"cpu": "127.0.0.1:5000/det:2-cpu"}}},
    )
    rig.api("POST", "/deployments", revision)
    seen: set[tuple[str, str]] = set()

    def complete() -> bool:
        state = page.evaluate(
            "[document.getElementById('dep-rollout').dataset.state, "
            "document.getElementById('dep-rollout').dataset.wave]"
        )
        seen.add((state[0], state[1]))
        return ("rolling", "0") in seen and state[0] == "complete"

    assert wait_until(complete, WAIT_MS / 1000), f"the page showed {sorted(seen)}"
    waves_seen = {wave for state, wave in seen if state == "rolling"}
    assert len(waves_seen) >= 2, f"saw waves {waves_seen}: the page did not follow the rollout"
    waves = page.locator("tr.wave").count()
    assert waves >= 2 and page.locator("tr.wave[data-started=yes]").count() == waves
    assert page.locator("#dep-devices tr[data-status=healthy]").count() == len(SIM_DEVICES)
    assert "det:" in page.inner_text("pre.yaml")
    shot(page, "deployment")


def test_halted_rollout_shows_its_reason(page: Any, rig: Rig) -> None:
    page.goto(f"{rig.url}/ui/deployments/broken")
    until(page, "document.getElementById('dep-rollout').dataset.state === 'halted'")
    message = page.inner_text("#rollout-message")
    assert "halted" in message or "failed" in message, message
    shot(page, "deployment-halted")
    page.goto(f"{rig.url}/ui/deployments")
    assert page.locator("tr[data-deployment=broken] .badge").inner_text() == "halted"
    shot(page, "deployments")


def test_device_going_offline_is_shown(page: Any, rig: Rig) -> None:
    page.goto(f"{rig.url}/ui/devices/{GONE}")
    until(page, "document.getElementById('presence').textContent === 'online'")
    rig.stop("gone")
    until(page, "document.getElementById('presence').textContent === 'offline'")
    assert "offline" in page.inner_text("#offline-note")
    until(page, "document.querySelectorAll('#online-history li').length >= 2")
    assert page.locator("#online-history li").first.get_attribute("data-online") == "no"
    page.goto(f"{rig.url}/ui/")
    page.wait_for_selector(f"#ov-events li[data-kind=offline] >> text={GONE}")
    shot(page, "overview")


def test_hostile_device_data_runs_no_script(page: Any, rig: Rig) -> None:
    page.goto(f"{rig.url}/ui/devices/{EVIL}")
    until(page, "document.getElementById('reason') !== null")
    assert HOSTILE in page.inner_text("#reason")  # shown as text
    assert HOSTILE in page.inner_text("tr[data-module=det]")
    no_script_ran(page)
    page.click("button.show-logs[data-module=det]")
    until(page, "document.getElementById('log-lines').textContent.includes('model loaded')")
    assert page.inner_text("#log-lines").splitlines() == HOSTILE_LOG
    no_script_ran(page)
    shot(page, "hostile-device")
    for path in ("/ui/", f"/ui/devices?q={EVIL}"):
        page.goto(rig.url + path)
        page.wait_for_selector(f"text={EVIL}")
        no_script_ran(page)
    assert HOSTILE in page.inner_text(f"#row-{EVIL}")
    assert PAGE_ERRORS == []


def test_models_page_and_logout(page: Any, rig: Rig) -> None:
    rig.api(
        "POST", "/models/digits?filename=model.onnx&tag=stage=prod", b"onnx-bytes", "application/octet-stream"
    )
    rig.api("POST", "/deployments?model=digits:1", _manifest("classify", [EVIL]))
    page.goto(f"{rig.url}/ui/models")
    assert page.locator("h1").inner_text() == "Models"
    assert "stage=prod" in page.inner_text("#versions tbody tr")
    packages = page.inner_text("#packages")
    assert "digits:1" in packages and "127.0.0.1:5000/det" in packages and "deployment classify" in packages
    shot(page, "models")
    page.click("form.logout button")
    page.wait_for_url(re.compile(r"/ui/login$"))
    page.goto(f"{rig.url}/ui/")
    assert page.url.endswith("/ui/login")


def test_posts_without_the_csrf_token_are_refused(page: Any, rig: Rig) -> None:
    page.goto(f"{rig.url}/ui/login")
    page.fill("#token", TOKEN)
    page.click("#login")
    page.wait_for_url(re.compile(r"/ui/$"))
    status = page.evaluate(
        """async (url) => (await fetch(url, {method: 'POST', credentials: 'same-origin',
             headers: {'Content-Type': 'application/x-www-form-urlencoded'}, body: 'csrf=wrong'})).status""",
        "/ui/deployments/vision/delete",
    )
    assert status == 403
    assert rig.api("GET", "/deployments/vision")["manifest"]["name"] == "vision"
