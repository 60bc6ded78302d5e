"""Dashboard at fleet scale: page render times with N devices in the store, and what it costs in memory.

The store is filled the way a real fleet fills it: N devices are inserted into a fresh SQLite
database (profiles ``cpu``/``cuda``/``openvino-myriad``, tags ``site=s0..s9``), ``edgectl serve``
runs with its controller on a real Mosquitto, ``edgectl simulate`` runs N real agents (simulated
modules) that connect and report, and a deployment with three waves is applied to them through the
REST API; the bench waits until the store holds a report from every device.

Then two servers run over that store with the controller off (so both do the same background
work: none), one with the dashboard and one with ``--no-dashboard``:

- **render**: wall time of ``GET`` for the overview, the devices page (SQL path: sort by id; and
  the presence path: ``status=online&sort=last_seen``, which judges every device), a deep page,
  a device and the deployment, each ``--rounds`` times (median and worst), beside the REST API's
  ``GET /devices`` (every device with its state) and ``GET /deployments`` on the same store;
- **RSS**: resident memory of each server after start-up and after the requests (the dashboard
  server also keeps ``--streams`` live pages open for 5 s);
- **live update**: from a change in the store (a device's tag set through the REST API) to its
  row's new HTML arriving on an open devices page (server-sent events), ``--rounds`` times.

    python3 -m bench.dashboard [--devices 10000] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from http.cookiejar import CookieJar
from pathlib import Path

import psutil
import yaml
from sqlalchemy import func, select

from bench._servers import free_port, mosquitto
from cloud.keys import load_or_create_signing_key, public_key_path
from cloud.store.db import open_database
from cloud.store.devices import Device, DeviceTag
from cloud.store.fleet import ReportedRecord
from harness.simulate import device_ids

TOKEN = "bench-dashboard-token-0123456789"
PROFILES = ("cpu", "cpu", "cpu", "cuda", "openvino-myriad")
TARGET_RENDER_S = 1.0
TARGET_EXTRA_MB = 50.0
WAIT_S = 900.0
BROKER = ("log_type error", "log_dest stderr", "max_queued_messages 100000")


@dataclass
class Timing:
    """Wall times of one page over the rounds."""

    label: str
    path: str
    median_s: float
    worst_s: float
    bytes: int


@dataclass
class Result:
    """Everything the bench measured."""

    devices: int
    fill_s: float
    timings: list[Timing]
    rss_idle_mb: dict[str, float]
    rss_after_mb: dict[str, float]
    latency_s: list[float]
    """Store change → fragment on a live page, per round."""
    load_average: tuple[float, float, float]


def log(message: str) -> None:
    """Progress on stderr."""
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _insert_devices(data: Path, ids: list[str]) -> None:
    db = open_database(f"sqlite:///{data / 'edgedeploy.db'}")
    try:
        with db.transaction() as s:
            s.add_all(
                Device(id=d, profile=PROFILES[i % len(PROFILES)], password_hash="unused")
                for i, d in enumerate(ids)
            )
            s.flush()
            s.add_all(
                [DeviceTag(device_id=d, key="site", value=f"s{i % 10}") for i, d in enumerate(ids)]
                + [DeviceTag(device_id=d, key="simulated", value="true") for d in ids]
            )
    finally:
        db.dispose()


def _reported(data: Path) -> int:
    db = open_database(f"sqlite:///{data / 'edgedeploy.db'}")
    try:
        with db.transaction() as s:
            return int(s.scalar(select(func.count()).select_from(ReportedRecord)) or 0)
    finally:
        db.dispose()


@contextmanager
def serve(data: Path, broker_url: str, *extra: str) -> Iterator[tuple[str, psutil.Process]]:
    """``edgectl serve`` on a free port; yields its URL and process."""
    port = free_port()
    argv = [sys.executable, "-m", "cloud.cli", "serve", "--data-dir", str(data), "--port", str(port)]
    env = {**os.environ, "EDGE_API_TOKEN": TOKEN, "EDGE_DB_URL": ""}
    with (data.parent / f"serve-{port}.log").open("wb") as out:
        proc = subprocess.Popen([*argv, "--broker", broker_url, *extra], env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"edgectl serve did not start; see {data.parent}/serve-{port}.log"
                    ) from None
                time.sleep(0.1)
        yield url, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)


def rest(url: str, method: str = "GET", body: str | None = None, media: str = "application/yaml") -> bytes:
    """One REST call with the bearer token."""
    request = urllib.request.Request(
        url,
        data=body.encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": media},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        return bytes(response.read())


def browser_session(url: str) -> urllib.request.OpenerDirector:
    """An opener logged in to the dashboard (session cookie), as a browser would be."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    form = opener.open(f"{url}/ui/login", timeout=30).read().decode()
    csrf = form.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    body = urllib.parse.urlencode({"csrf": csrf, "token": TOKEN}).encode()
    request = urllib.request.Request(f"{url}/ui/login", data=body, headers={"Origin": url})
    page = opener.open(request, timeout=30)
    if not page.geturl().endswith("/ui/"):
        raise SystemExit("could not log in to the dashboard")
    return opener


def timed(label: str, path: str, fetch: Callable[[], bytes], rounds: int) -> Timing:
    """Median and worst wall time of ``fetch`` over ``rounds`` (after one warm-up)."""
    fetch()
    times, size = [], 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        size = len(fetch())
        times.append(time.perf_counter() - t0)
    return Timing(label, path, statistics.median(times), max(times), size)


def _page(opener: urllib.request.OpenerDirector, url: str) -> Callable[[], bytes]:
    return lambda: bytes(opener.open(url, timeout=300).read())


def _rest(url: str) -> Callable[[], bytes]:
    return lambda: rest(url)


def _stream(opener: urllib.request.OpenerDirector, url: str, seconds: float) -> None:
    with opener.open(url, timeout=seconds + 10) as response:
        end = time.monotonic() + seconds
        while time.monotonic() < end and response.read1(65536):
            pass


def update_latency(opener: urllib.request.OpenerDirector, url: str, device: str, rounds: int) -> list[float]:
    """Seconds from a store change (a tag set through the REST API) to the row's fragment on a live page."""
    lines: queue.Queue[tuple[float, bytes]] = queue.Queue()
    stream = opener.open(f"{url}/ui/events?view=devices&ids={device}", timeout=120)

    def read() -> None:
        # Ends when ``stream.close()`` pulls the connection from under it (whatever http.client raises).
        with contextlib.suppress(Exception):
            for line in stream:
                lines.put((time.perf_counter(), line))

    threading.Thread(target=read, daemon=True).start()
    out = []
    for i in range(rounds):
        time.sleep(1.5)  # changes farther apart than a stream's recompute gap, as an operator sees them
        marker = f"latency={i}"
        t0 = time.perf_counter()
        rest(f"{url}/devices/{device}", "PATCH", json.dumps({"set": {"bench": marker}}), "application/json")
        while True:
            at, line = lines.get(timeout=60)
            if line.startswith(b"data:") and f"bench={marker}".encode() in line:
                out.append(at - t0)
                break
    stream.close()
    return out


def rss_mb(process: psutil.Process) -> float:
    """Resident memory in MiB."""
    return float(process.memory_info().rss) / 2**20


def fill(n: int, data: Path, broker_url: str) -> float:
    """Devices, a running simulated fleet and a deployment; seconds until every device reported."""
    ids = device_ids(n)
    _insert_devices(data, ids)
    load_or_create_signing_key(data)
    started = time.monotonic()
    argv = [
        sys.executable, "-m", "cloud.cli", "simulate", "--devices", str(n), "--broker", broker_url,
        "--public-key", str(public_key_path(data)), "--processes", "1" if n <= 2000 else "2",
        "--rate", "1000", "--heartbeat", "600", "--quiet", "--log-level", "error", "--data-dir", str(data),
    ]  # fmt: skip
    with serve(data, broker_url, "--interval", "1") as (url, _):
        with (data.parent / "simulator.log").open("wb") as out:
            simulator = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=out)
        try:
            manifest = {
                "name": "bench",
                "target": {"tags": {"simulated": "true"}},
                "modules": {"det": {"images": {p: f"registry.local/det:1-{p}" for p in set(PROFILES)}}},
                "rollout": {"waves": ["10%", "30%", "100%"], "max_failure_ratio": 0.2},
                "health_deadline_s": 300,
            }
            rest(f"{url}/deployments", "POST", yaml.safe_dump(manifest))
            deadline = time.monotonic() + WAIT_S
            while (got := _reported(data)) < n:
                if time.monotonic() > deadline or simulator.poll() is not None:
                    raise SystemExit(f"only {got} of {n} devices reported; see {data.parent}/simulator.log")
                time.sleep(1)
            filled = time.monotonic() - started
            log(f"{n:,} devices reported after {filled:.0f} s; letting the first waves roll for 10 s")
            time.sleep(10)
        finally:
            simulator.send_signal(signal.SIGKILL)  # their last wills come only after the keepalive
            simulator.wait(60)
    return filled


def measure(n: int, rounds: int, streams: int, work: Path) -> Result:
    """Fill the store, then time pages and compare the two servers' memory."""
    data = work / "data"
    data.mkdir(parents=True)
    with mosquitto(work, *BROKER) as broker:
        broker_url = f"mqtt://127.0.0.1:{broker.port}"
        log(f"filling the store with {n:,} simulated devices ...")
        fill_s = fill(n, data, broker_url)
        some = device_ids(n)[n // 2]
        rss_idle: dict[str, float] = {}
        rss_after: dict[str, float] = {}
        timings: list[Timing] = []
        with serve(data, broker_url, "--no-controller", "--no-dashboard") as (url, proc):
            time.sleep(1)
            rss_idle["without dashboard"] = rss_mb(proc)
            for path in ("/healthz", "/status", "/deployments"):
                rest(url + path)
            rss_after["without dashboard"] = rss_mb(proc)
        with serve(data, broker_url, "--no-controller") as (url, proc):
            time.sleep(1)
            rss_idle["with dashboard"] = rss_mb(proc)
            opener = browser_session(url)
            pages = [
                ("overview", "/ui/"),
                ("devices, page 1 by id", "/ui/devices"),
                ("devices, online by last seen", "/ui/devices?status=online&sort=last_seen&desc=1"),
                ("devices, tag + profile", "/ui/devices?tag=site%3Ds3&profile=cuda"),
                ("devices, page 150", "/ui/devices?page=150"),
                ("device", f"/ui/devices/{some}"),
                ("deployment", "/ui/deployments/bench"),
            ]
            for label, path in pages:
                timings.append(timed(label, path, _page(opener, url + path), rounds))
                log(f"{label}: {timings[-1].median_s * 1000:.0f} ms")
            threads = [
                threading.Thread(target=_stream, args=(opener, f"{url}/ui/events?view={view}", 5.0))
                for view in ("overview", "deployments", *(["overview"] * max(0, streams - 2)))
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            rss_after["with dashboard"] = rss_mb(proc)
            latency = update_latency(opener, url, some, rounds)
            log(f"live update: median {statistics.median(latency) * 1000:.0f} ms")
            for label, path in (
                ("REST GET /devices (all)", "/devices"),
                ("REST GET /deployments", "/deployments"),
            ):
                timings.append(timed(label, path, _rest(url + path), max(1, rounds // 2)))
                log(f"{label}: {timings[-1].median_s * 1000:.0f} ms")
    return Result(n, fill_s, timings, rss_idle, rss_after, latency, os.getloadavg())


def show(r: Result) -> None:
    """The table docs/benchmarks.md quotes."""
    cores = psutil.cpu_count()
    load = ", ".join(f"{x:.2f}" for x in r.load_average)
    print(f"\nDashboard with {r.devices:,} devices in the store ({cores} cores, load average {load})")
    print(f"store filled by a real simulated fleet in {r.fill_s:.0f} s\n")
    print("| page | median | worst | size | target |")
    print("| --- | ---: | ---: | ---: | --- |")
    for t in r.timings:
        target = f"≤ {TARGET_RENDER_S:g} s" if t.path.startswith("/ui") else "(comparison)"
        print(
            f"| {t.label} (`{t.path}`) | {t.median_s * 1000:.0f} ms | {t.worst_s * 1000:.0f} ms "
            f"| {t.bytes / 1024:.0f} KiB | {target} |"
        )
    print("\n| server | RSS at start | RSS after the requests |")
    print("| --- | ---: | ---: |")
    for name in ("without dashboard", "with dashboard"):
        print(f"| {name} | {r.rss_idle_mb[name]:.1f} MiB | {r.rss_after_mb[name]:.1f} MiB |")
    print(
        f"\nlive update, store change to the row on an open devices page: median "
        f"{statistics.median(r.latency_s) * 1000:.0f} ms, worst {max(r.latency_s) * 1000:.0f} ms "
        f"over {len(r.latency_s)} changes (target ≤ 2 s)"
    )
    extra = r.rss_after_mb["with dashboard"] - r.rss_after_mb["without dashboard"]
    print(f"\ndashboard costs {extra:+.1f} MiB after the requests (target ≤ {TARGET_EXTRA_MB:g} MB)")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the tables (``--json``: the figures as JSON)."""
    parser = argparse.ArgumentParser(prog="python3 -m bench.dashboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000, help="devices in the store (default 10000)")
    parser.add_argument("--rounds", type=int, default=5, help="requests per page (default 5)")
    parser.add_argument("--streams", type=int, default=3, help="live pages kept open (default 3)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the tables")
    args = parser.parse_args(argv)
    if args.devices < 10 or args.rounds < 1:
        parser.error("give --devices >= 10 and --rounds >= 1")
    with tempfile.TemporaryDirectory(prefix="bench-dashboard-") as tmp:
        result = measure(args.devices, args.rounds, args.streams, Path(tmp))
    if args.json:
        print(json.dumps(asdict(result), indent=2))
    else:
        show(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
