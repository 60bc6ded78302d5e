"""The fault suite's rig: a real ``edge-agent run`` process, the cloud's view of it, and the truth.

``FaultDevice`` is one device: its keys, unpacked module images (digits, under two tags), a real
agent subprocess with the process runtime (``AgentProcess``: started, SIGKILLed, restarted,
optionally inside a network namespace), the cloud side over the real broker (``CloudSide``), and
the cloud's store (a real ``Ingestor`` into SQLite). ``module_processes`` reads what really runs
on the machine from ``/proc`` (the processes whose working directory is one of the device's
module images), so every check compares the report and the store with the processes themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.runtime.process import image_dir
from cloud.fleet.ingest import Ingestor
from cloud.store.db import Database, open_database
from cloud.store.devices import Device
from cloud.store.fleet import OnlineRecord, ReportedRecord
from edgemqtt.endpoint import Endpoint
from modules.contract import ReportedState
from tests.integration.agent_rig import CloudSide, Keys, desired_state, fast_health
from tests.integration.module_image import DigitsBuild, write_module_dir
from tests.services import REPO_ROOT, free_port, log_tail

IMAGES = ("localhost:5000/edge/digits:1", "localhost:5000/edge/digits:2")
"""Two tags of the same module: an update alternates them, so the running process shows which."""


@dataclass(frozen=True)
class ModuleProcess:
    """A module that runs one of a device's module images: its process group's leader, and every
    process of the group that runs the image (the scoring server's worker processes)."""

    pid: int
    image: str
    cmdline: str
    members: tuple[int, ...] = ()


def module_processes(images: Path) -> list[ModuleProcess]:
    """Every live module on this machine (a process group) whose working directory is a module
    image under ``images``; a group whose leader is gone still counts, as its first process."""
    groups: dict[int, list[tuple[int, str, str]]] = {}
    roots = {str(image_dir(images, ref)): ref for ref in IMAGES}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if fields[0] == "Z":
            continue
        image = roots.get(cwd)
        if image is not None:
            groups.setdefault(int(fields[2]), []).append((int(entry.name), image, cmdline))
    found = []
    for group, procs in groups.items():
        procs.sort(key=lambda p: (p[0] != group, p[0]))  # the leader first
        pid, image, cmdline = procs[0]
        found.append(ModuleProcess(pid, image, cmdline, tuple(sorted(p[0] for p in procs))))
    return sorted(found, key=lambda p: p.pid)


def listener_pids(port: int, prefix: Sequence[str] = ()) -> list[int]:
    """The pids listening on TCP ``port`` (inside the namespace ``prefix`` runs in, if any)."""
    done = subprocess.run(
        [*prefix, "ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, check=False, timeout=30
    )
    return sorted({int(pid) for pid in re.findall(r"pid=(\d+)", done.stdout)})


SCORE_LOOP = r"""
import json, os, sys, time, urllib.request
url, body_path, stop_path, out_path = sys.argv[1:5]
body = open(body_path, "rb").read()
ok, failed, errors = 0, 0, []
while not os.path.exists(stop_path):
    try:
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            reply.read()
        ok += 1
    except Exception as e:
        failed += 1
        errors.append(f"{time.time():.1f}: {e}")
    time.sleep(0.05)
with open(out_path, "w") as out:
    json.dump({"ok": ok, "failed": failed, "errors": errors[-20:]}, out)
"""


class ScoreLoop:
    """A client that POSTs the digits sample to ``/score`` back to back until ``finish()``.

    It is a separate process (``prefix`` can put it in the device's network namespace), so what it
    sees is what a client next to the device sees.
    """

    def __init__(self, folder: Path, port: int, sample: bytes, prefix: Sequence[str] = ()) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        body = folder / "sample.json"
        body.write_bytes(sample)
        self.stop_path = folder / "stop"
        self.out_path = folder / "result.json"
        url = f"http://127.0.0.1:{port}/score"
        self.process = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-c",
                SCORE_LOOP,
                url,
                str(body),
                str(self.stop_path),
                str(self.out_path),
            ]
        )

    def finish(self) -> dict[str, Any]:
        """Stop the loop; returns ``{"ok": n, "failed": n, "errors": [...]}``."""
        self.stop_path.touch()
        self.process.wait(60)
        return json.loads(self.out_path.read_text())

    def kill(self) -> None:
        """End the loop at once (cleanup after a failure)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)


class AgentProcess:
    """``python -m agent run --config FILE`` as a child process, its output appended to ``log``."""

    def __init__(self, config: Path, log: Path, prefix: Sequence[str] = ()) -> None:
        self.config = config
        self.log = log
        self.prefix = list(prefix)
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        """Start the agent (a previous one must have exited)."""
        assert self.process is None or self.process.poll() is not None, "the agent is still running"
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        with self.log.open("ab") as out:
            out.write(f"--- agent start {self.starts + 1}\n".encode())
            out.flush()
            self.process = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "agent", "run", "--config", str(self.config)],
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    def kill(self) -> None:
        """SIGKILL the agent and reap it (its modules keep running: that is the point)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(30)

    def stop(self) -> None:
        """SIGTERM the agent and wait for it to exit (SIGKILL after 30 s)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, lines: int = 15) -> str:
        """The end of the agent's log, for failure messages."""
        return log_tail(self.log, lines)


class FaultDevice:
    """One device under test: agent process, module images, cloud side and the cloud's store."""

    def __init__(
        self,
        root: Path,
        digits: DigitsBuild,
        cloud_port: int,
        *,
        broker_url: str | None = None,
        prefix: Sequence[str] = (),
        heartbeat_s: float = 2.0,
        keepalive_s: int = 5,
    ) -> None:
        self.root = root
        self.id = f"fault-{uuid.uuid4().hex[:8]}"
        self.keys = Keys(root / "keys")
        self.images = root / "images"
        for ref in IMAGES:
            write_module_dir(image_dir(self.images, ref), digits)
        self.state_dir = root / "state"
        self.port = free_port()
        self.keepalive_s = keepalive_s
        config = {
            "device_id": self.id,
            "broker": {
                "url": broker_url or f"mqtt://127.0.0.1:{cloud_port}",
                "reconnect_min_s": 1,
                "reconnect_max_s": 2,
                "keepalive_s": keepalive_s,
            },
            "cloud_public_key": str(self.keys.public_path),
            "state_dir": str(self.state_dir),
            "runtime": "process",
            "images_dir": str(self.images),
            "restart": {"base_s": 0.5, "max_s": 2.0},
            "heartbeat_s": heartbeat_s,
        }
        self.config_path = root / "agent.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.agent = AgentProcess(self.config_path, root / "agent.log", prefix)
        self.cloud = CloudSide(cloud_port, self.id)
        self.generation = 0
        self.clients: list[ScoreLoop] = []
        self.db: Database = open_database(f"sqlite:///{root / 'cloud.db'}")
        with self.db.transaction() as s:
            s.add(Device(id=self.id, profile="cpu", password_hash="unused"))
        self.ingestor = Ingestor(
            self.db, Endpoint.parse(f"mqtt://127.0.0.1:{cloud_port}"), flush_interval_s=0.1
        )

    def module(self, image: str) -> dict[str, Any]:
        """The desired ``web`` module on ``image``, on this device's fixed host port."""
        return {"image": image, "ports": [{"container": 5001, "host": self.port}], "health": fast_health()}

    def publish_update(self) -> tuple[int, str]:
        """Publish the next generation (the other image tag); returns (generation, image)."""
        self.generation += 1
        image = IMAGES[self.generation % 2]
        state = desired_state(self.id, self.generation, {"web": self.module(image)}, key=self.keys.private)
        self.cloud.publish_desired(state)
        return self.generation, image

    def score_loop(self, folder: Path, sample: bytes, prefix: Sequence[str] = ()) -> ScoreLoop:
        """A client scoring ``web`` back to back (ended by ``cleanup`` if the test does not finish it)."""
        client = ScoreLoop(folder, self.port, sample, prefix)
        self.clients.append(client)
        return client

    def processes(self) -> list[ModuleProcess]:
        """The device's module processes that really run now."""
        return module_processes(self.images)

    def record(self) -> dict[str, Any] | None:
        """The process runtime's record of ``web`` (it must always parse)."""
        path = self.state_dir / "modules" / "web" / "record.json"
        return json.loads(path.read_text()) if path.exists() else None

    def stored(self) -> tuple[ReportedState | None, bool | None]:
        """The cloud's view: the stored report and whether the device is online."""
        with self.db.transaction() as s:
            row = s.get(ReportedRecord, self.id)
            online = s.get(OnlineRecord, self.id)
            report = ReportedState.model_validate_json(row.payload) if row is not None else None
            return report, (online.online if online is not None else None)

    def state_files_parse(self) -> list[str]:
        """Every JSON file the agent keeps in its state dir that does not parse (should be none)."""
        broken = []
        for path in self.state_dir.rglob("*.json"):
            try:
                json.loads(path.read_text())
            except (OSError, ValueError) as e:
                broken.append(f"{path}: {e}")
        return broken

    def describe(self) -> str:
        """What runs and what was reported, for failure messages."""
        procs = ", ".join(f"pid {p.pid} on {p.image}" for p in self.processes()) or "none"
        report, online = self.stored()
        last = self.cloud.reports[-1] if self.cloud.reports else None
        return (
            f"processes: {procs}; record: {self.record()}; store: online={online}, "
            f"generation={report.generation_applied if report else None}, "
            f"status={report.deployment_status if report else None}; last MQTT report: "
            f"{last.model_dump_json() if last else None}; agent log: {self.agent.tail()}"
        )

    async def cleanup(self) -> None:
        """Stop clients and the agent, then every module process it left, and close the cloud side."""
        for client in self.clients:
            client.kill()
        await asyncio.to_thread(self.agent.stop)
        for proc in self.processes():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                for pid in proc.members or (proc.pid,):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        self.cloud.close()
        self.db.dispose()
