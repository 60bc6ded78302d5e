"""``ProcessRuntime``: modules as local ``python -m modules.scoring`` processes (no container engine).

For devices without Docker Engine and for fleet simulations. An image reference names an
unpacked module directory, laid out like ``/module`` inside an image (``module.json``,
``models/<name>/<version>/...``, optional ``src/score.py``)::

    <images_dir>/<repository>/<tag>/            for  registry/repo:tag
    <images_dir>/<repository>/sha256-<hex>/     for  registry/repo@sha256:<hex> (the digest wins)

(image references keep the contract's grammar; a directory path is not one). Without a
``RegistryPuller`` this runtime downloads nothing: ``pull`` succeeds when the directory is there
and otherwise fails with the path it expected, so whatever provisions the device (or the
simulator) unpacks modules there. With one (``pull.method: resumable``), ``pull`` fetches the
image from its registry (resuming, verified) and unpacks its ``/module`` folder there.

Each module has a folder ``<state_dir>/modules/<name>/`` with ``record.json`` (what a container's
labels and state would hold) and ``module.log`` (stdout and stderr; ``logs`` tails it). The
process gets the environment the image would set (``MODULE_JSON``, ``MODEL_DIR``,
``AZUREML_MODEL_DIR``, ``ENTRY_SCRIPT``, ``PORT``, ``HOST``, ``PROFILE``) plus the module's ``env``
(which wins), runs on the agent's own Python and onnxruntime, listens on
the host side of the port mapping for ``health.port`` (a free port when ``host`` is not given),
and runs in its own session, so ``stop`` signals its whole process group (SIGTERM, then SIGKILL).
``resources.cpus`` becomes ``SCORING_THREADS``; memory limits are not enforced (no cgroup here).

Agent restarts: processes are started in their own session and outlive the agent. A new runtime
on the same ``state_dir`` adopts a recorded process when its pid is alive with the recorded start
time (``/proc/<pid>/stat``), so a pid reused by another program is never adopted or signalled.
The exit code of an adopted process is unknown when it exits (it is not this agent's child), and
``observe`` reports ``exit_code=None`` for it, which the restart policy counts as a failure.

Every start gets a new instance id, written to ``record.json`` *before* the process is spawned
(the intent) and passed to it as ``EDGE_INSTANCE_ID`` next to ``EDGE_RUNTIME_ROOT`` (this
runtime's folder): the marks by which the runtime knows its processes whatever happened to the
agent. The first ``observe`` of a runtime looks through ``/proc/*/environ`` for processes with
its mark: the one whose instance a record names is adopted (an agent killed between the spawn and
the record of the pid left it), every other one is an orphan and its process group is stopped,
so a module never runs twice and never keeps a port its successor needs. The scoring server
echoes the instance id to health probes, so only the instance started last is judged healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import sys
import tarfile
import uuid
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

import modules
from agent.actions import Create, Pull, Remove, Restart, Start, Stop
from agent.credentials import CredentialError, Credentials, pull_auth
from agent.observed import ObservedModule
from agent.runtime import Observation, RuntimeActionError
from agent.runtime.image_gc import ImageBook, PulledRecord, collect, sweep_partials, unreferenced_blobs
from agent.runtime.image_load import unpack_module
from agent.runtime.pulls import PullTracker
from agent.runtime.registry_pull import RegistryPuller
from modules.contract import (
    INSTANCE_ENV,
    DesiredModule,
    HealthCheck,
    ModuleInfo,
    PortMapping,
    split_image_ref,
    utcnow,
)

CODE_ROOT = Path(modules.__file__).resolve().parent.parent
"""The folder holding the ``modules`` package the processes run (put on their PYTHONPATH)."""
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "TMPDIR")
"""Variables of the agent's own environment a module process inherits; nothing else leaks."""
LOG_ROTATE_BYTES = 10 * 1024 * 1024
_TAIL_CHUNK = 64 * 1024
ROOT_ENV = "EDGE_RUNTIME_ROOT"
"""Marks every process a runtime starts with the runtime's folder (see the module docstring)."""

ProcessStatus = Literal["created", "running", "exited"]


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessRecord:
    """What the runtime keeps about one module (``record.json``)."""

    module: str
    image: str
    image_dir: str
    config_hash: str
    spec: dict[str, Any]
    status: ProcessStatus = "created"
    pid: int | None = None
    pid_start: str | None = None
    host: str = "127.0.0.1"
    port: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    exit_code: int | None = None
    generation: int | None = None
    """The generation of the desired state the module was created from."""
    instance: str | None = None
    """The id of the latest start, recorded before the process is spawned (``EDGE_INSTANCE_ID``)."""

    @property
    def desired(self) -> DesiredModule:
        """The module's spec as it was created."""
        return DesiredModule.model_validate(self.spec)


def image_dir(images_dir: Path, image: str) -> Path:
    """The directory an image reference names (see the module docstring)."""
    parts = split_image_ref(image)
    leaf = parts.digest.replace(":", "-") if parts.digest else (parts.tag or "latest")
    return images_dir / parts.repository / leaf


def listen_mapping(spec: DesiredModule) -> PortMapping | None:
    """The port mapping the process listens on: the one for ``health.port``, else the first TCP one."""
    tcp = [p for p in spec.ports if p.protocol == "tcp"]
    return next((p for p in tcp if p.container == spec.health.port), tcp[0] if tcp else None)


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def proc_start_ticks(pid: int, proc_root: Path = Path("/proc")) -> str | None:
    """The start time (clock ticks after boot) of a live, non-zombie process, or None."""
    try:
        raw = (proc_root / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


@dataclass(frozen=True)
class MarkedProcess:
    """A process carrying a runtime's mark: the leader of the process group a start created."""

    pid: int
    start: str
    instance: str | None


def marked_processes(root: Path, proc_root: Path = Path("/proc")) -> list[MarkedProcess]:
    """Live process-group leaders whose environment says ``root``'s runtime started them."""
    mark = f"{ROOT_ENV}={root}".encode()
    found = []
    for entry in proc_root.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:  # gone, or not ours to read
            continue
        if mark not in environ:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) < 20 or fields[0] in ("Z", "X") or fields[2] != entry.name:
            continue  # a zombie, or a child inside a module's group (the leader stands for it)
        prefix = f"{INSTANCE_ENV}=".encode()
        instance = next((v[len(prefix) :].decode() for v in environ if v.startswith(prefix)), None)
        found.append(MarkedProcess(int(entry.name), fields[19], instance))
    return found


def _exit_status(returncode: int) -> int:
    """Docker's convention: a process killed by signal N exits with 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def tail_lines(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a text file (reading only the end of a large file)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            data = b""
            offset = size
            while offset > 0 and data.count(b"\n") <= lines:
                step = min(_TAIL_CHUNK, offset)
                offset -= step
                fh.seek(offset)
                data = fh.read(step) + data
    except FileNotFoundError:
        return ""
    text = data.decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:]) + ("\n" if text.endswith("\n") and lines else "")


class ProcessRuntime:
    """Runs modules as child processes; records under ``state_dir`` let a restarted agent adopt them."""

    def __init__(
        self,
        state_dir: Path,
        images_dir: Path,
        *,
        python: str = sys.executable,
        stop_timeout_s: float = 10.0,
        proc_root: Path = Path("/proc"),
        puller: RegistryPuller | None = None,
        pulls: PullTracker | None = None,
        credentials: Credentials | None = None,
        sealing_key: X25519PrivateKey | None = None,
        device_id: str = "",
        images: ImageBook | None = None,
        gc_grace: timedelta = timedelta(days=1),
    ) -> None:
        """``puller``: fetch missing images from their registry and unpack them (else a missing
        module directory fails the pull); ``pulls``: the tracker (update window); ``credentials``,
        ``sealing_key`` and ``device_id`` open the registry credentials of the desired state;
        ``images``: the book of the modules this runtime unpacked, removed by ``collect_images``
        ``gc_grace`` after nothing needs them (no book: nothing is ever removed)."""
        self.root = Path(state_dir) / "modules"
        self.images_dir = Path(images_dir)
        self.python = python
        self.stop_timeout_s = stop_timeout_s
        self.proc_root = proc_root
        self.puller = puller
        self.pulls = pulls or PullTracker()
        self.credentials: Credentials = credentials or {}
        self.sealing_key = sealing_key
        self.device_id = device_id
        self.images = images
        self.gc_grace = gc_grace
        self._children: dict[str, asyncio.subprocess.Process] = {}
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._records: dict[str, ProcessRecord] = {}
        self._recovered = False
        self.root.mkdir(parents=True, exist_ok=True)

    # --- records -------------------------------------------------------------------------------

    def _folder(self, module: str) -> Path:
        return self.root / module

    def _load(self, module: str) -> ProcessRecord | None:
        path = self._folder(module) / "record.json"
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise RuntimeActionError(module, f"cannot read {path}: {exc}") from None
        return ProcessRecord(**data)

    def _save(self, record: ProcessRecord) -> ProcessRecord:
        folder = self._folder(record.module)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "record.json.tmp"
        with tmp.open("w") as fh:
            json.dump(asdict(record), fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / "record.json")
        self._records[record.module] = record
        return record

    def _require(self, module: str) -> ProcessRecord:
        record = self._load(module)
        if record is None:
            raise RuntimeActionError(module, f"no such module (no record in {self._folder(module)})")
        return record

    def _alive(self, record: ProcessRecord) -> bool:
        return (
            record.pid is not None
            and record.pid_start is not None
            and proc_start_ticks(record.pid, self.proc_root) == record.pid_start
        )

    async def _settle(self, record: ProcessRecord) -> ProcessRecord:
        """The record with a ``running`` process that is gone turned into ``exited``."""
        if record.status != "running" or self._alive(record):
            return record
        watcher = self._watchers.get(record.module)
        if watcher is not None:
            await asyncio.shield(watcher)
            return self._require(record.module)
        return self._save(replace(record, status="exited", exit_code=None, finished_at=utcnow().isoformat()))

    # --- observing -----------------------------------------------------------------------------

    async def recover(self) -> None:
        """Adopt the processes records name by instance, stop every other one with this runtime's mark."""
        self._recovered = True
        marked = await asyncio.to_thread(marked_processes, self.root.resolve(), self.proc_root)
        by_instance = {p.instance: p for p in marked if p.instance}
        claimed: set[int] = set()
        for folder in sorted(self.root.iterdir()):
            record = self._load(folder.name) if (folder / "record.json").is_file() else None
            if record is None:
                continue
            if self._alive(record):
                assert record.pid is not None
                claimed.add(record.pid)
                continue
            found = by_instance.get(record.instance) if record.instance else None
            if found is not None:  # spawned, but the agent died before recording the pid
                log.warning(
                    "module %s: adopting its process %d (instance %s), started before the agent stopped",
                    record.module,
                    found.pid,
                    record.instance,
                )
                self._save(
                    replace(
                        record,
                        status="running",
                        pid=found.pid,
                        pid_start=found.start,
                        started_at=record.started_at or utcnow().isoformat(),
                        finished_at=None,
                        exit_code=None,
                    )
                )
                claimed.add(found.pid)
        for orphan in (p for p in marked if p.pid not in claimed):
            log.warning(
                "stopping orphaned module process %d (instance %s): no record of this runtime claims it",
                orphan.pid,
                orphan.instance,
            )
            await self._stop_group(orphan.pid, orphan.start)

    async def _stop_group(self, pgid: int, start: str) -> None:
        """SIGTERM a process group whose leader is ``pgid`` (started at ``start``), then SIGKILL."""
        self._signal_group(pgid, signal.SIGTERM)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stop_timeout_s
        while proc_start_ticks(pgid, self.proc_root) == start:
            if loop.time() >= deadline:
                break
            await asyncio.sleep(0.05)
        self._signal_group(pgid, signal.SIGKILL)

    async def observe(self, images: Collection[str] = ()) -> Observation:
        """Every recorded module with its process state, and which of ``images`` are unpacked here."""
        if not self._recovered:
            await self.recover()
        out: dict[str, ObservedModule] = {}
        for folder in sorted(self.root.iterdir()):
            if not (folder / "record.json").is_file():
                continue
            record = self._load(folder.name)
            if record is None:
                continue
            record = await self._settle(record)
            self._records[record.module] = record
            out[record.module] = ObservedModule(
                name=record.module,
                image=record.image,
                status=record.status,
                config_hash=record.config_hash,
                image_id=record.image_dir,
                exit_code=record.exit_code if record.status == "exited" else None,
                started_at=_time(record.started_at),
                finished_at=_time(record.finished_at) if record.status == "exited" else None,
                instance=record.instance if record.status == "running" else None,
            )
        wanted = set(images) | self.pulls.requested
        present = {ref for ref in wanted if self._image_present(ref)}
        return out, self.pulls.availability(present)

    def _image_present(self, image: str) -> bool:
        try:
            return (image_dir(self.images_dir, image) / "module.json").is_file()
        except ValueError:
            return False

    def health_url(self, module: str, check: HealthCheck) -> str | None:
        """The address the module's process listens on (its ``health.port`` mapping), when it runs."""
        record = self._records.get(module)
        if record is None or record.status != "running" or record.port is None:
            return None
        mapping = listen_mapping(record.desired)
        if mapping is None or mapping.container != check.port:
            return None
        host = "127.0.0.1" if record.host in ("", "0.0.0.0", "::") else record.host
        return f"http://{host}:{record.port}"

    # --- pulling -------------------------------------------------------------------------------

    async def pull(self, action: Pull) -> None:
        """In the background: fetch and unpack ``action.image`` (with a puller), else check that its
        module directory is unpacked."""
        path = image_dir(self.images_dir, action.image)
        puller = self.puller

        async def check() -> None:
            if (path / "module.json").is_file():
                return
            if puller is None:
                raise RuntimeError(
                    "the process runtime cannot download images without its registry client "
                    f"(pull.method: resumable); unpack the module (module.json, models/) into {path}"
                )
            try:
                auth = pull_auth(action.credentials, self.device_id, self.credentials, self.sealing_key)
            except CredentialError as e:
                raise RuntimeError(str(e)) from None
            pulled = await puller.pull(
                action.image, auth, progress=lambda p: self.pulls.report(action.image, p)
            )
            try:
                await asyncio.to_thread(unpack_module, puller.store, pulled, path)
            except (OSError, ValueError, tarfile.TarError) as e:
                raise RuntimeError(f"cannot unpack {action.image} into {path}: {e}") from None
            log.info("unpacked %s into %s", action.image, path)
            if self.images is not None:
                await asyncio.to_thread(self.images.add, action.image, pulled.digests)

        self.pulls.start(action.image, check)

    # --- image garbage collection --------------------------------------------------------------

    async def collect_images(self, keep: Collection[str], now: datetime) -> list[str]:
        """Remove the module directories this runtime unpacked that neither ``keep`` nor a recorded
        module needed for ``gc_grace``, then the blobs no remaining image uses; the references
        removed. Nothing is collected while a download runs (its blobs are not in the book yet)."""
        if self.images is None or self.pulls.pulling:
            return []
        used = {record.image for record in self._records.values()}
        return await asyncio.to_thread(self._collect_blocking, set(keep) | used, now)

    def _collect_blocking(self, keep: set[str], now: datetime) -> list[str]:
        assert self.images is not None
        removed: list[str] = []

        def change(before: dict[str, PulledRecord]) -> dict[str, PulledRecord]:
            decision = collect(before, keep, now, self.gc_grace)
            for ref in decision.remove:
                shutil.rmtree(image_dir(self.images_dir, ref), ignore_errors=True)
                log.info("removed module image %s: neither desired nor last known good", ref)
                removed.append(ref)
            if self.puller is not None:
                self.puller.store.remove(unreferenced_blobs(self.puller.store.digests(), decision.book))
                sweep_partials(self.puller.store, now, self.gc_grace)
            return dict(decision.book)

        self.images.update(change)
        return removed

    # --- lifecycle -----------------------------------------------------------------------------

    async def create(self, action: Create) -> None:
        """Record the module (not started) after checking its directory and port mapping."""
        module, spec = action.module, action.spec
        if self._load(module) is not None:
            raise RuntimeActionError(module, f"already exists ({self._folder(module)})")
        path = image_dir(self.images_dir, spec.image)
        try:
            ModuleInfo.model_validate_json((path / "module.json").read_bytes())
        except FileNotFoundError:
            raise RuntimeActionError(
                module, f"image {spec.image} is not present: no {path / 'module.json'}"
            ) from None
        except (OSError, ValueError) as exc:
            raise RuntimeActionError(module, f"{path / 'module.json'} is unusable: {exc}") from None
        mapping = listen_mapping(spec)
        if mapping is None:
            raise RuntimeActionError(
                module, f"needs a TCP port mapping (container {spec.health.port}) to know where to listen"
            )
        self._save(
            ProcessRecord(
                module=module,
                image=spec.image,
                image_dir=str(path),
                config_hash=action.config_hash,
                spec=spec.model_dump(mode="json"),
                host=mapping.host_ip,
                port=mapping.host,
                generation=action.generation,
            )
        )

    def _environment(self, record: ProcessRecord, port: int, instance: str) -> dict[str, str]:
        spec = record.desired
        root = Path(record.image_dir)
        info = ModuleInfo.model_validate_json((root / "module.json").read_bytes())
        placement = {
            "PYTHONPATH": str(CODE_ROOT),
            "PYTHONUNBUFFERED": "1",
            "MODULE_JSON": str(root / "module.json"),
            "HOST": record.host,
            "PORT": str(port),
            "PROFILE": spec.profile,
            ROOT_ENV: str(self.root.resolve()),
            INSTANCE_ENV: instance,
        }
        if len(info.models) == 1:
            model = info.models[0]
            placement["MODEL_DIR"] = str(root / "models" / model.name / str(model.version))
        elif info.models:
            placement["MODEL_DIR"] = str(root / "models")
        if "MODEL_DIR" in placement:
            placement["AZUREML_MODEL_DIR"] = placement["MODEL_DIR"]
        if info.entry_script:
            script = Path(info.entry_script)
            candidates = [script] if script.is_absolute() else [root / "src" / script, root / script]
            placement["ENTRY_SCRIPT"] = str(next((c for c in candidates if c.is_file()), candidates[0]))
        ignored = sorted(set(spec.env) & set(placement))
        if ignored:
            log.warning(
                "module %s: env %s ignored: the process runtime sets these itself (where the module "
                "lives and which port it answers on)",
                record.module,
                ", ".join(ignored),
            )
        # The module's env may tune the server (SCORING_THREADS, LOG_LEVEL, ...) but never move it.
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ} | spec.container_env() | placement
        if spec.resources.cpus is not None:
            env.setdefault("SCORING_THREADS", str(max(1, math.ceil(spec.resources.cpus))))
        return env

    async def start(self, action: Start) -> None:
        """Start the module's process (nothing to do when it already runs)."""
        record = await self._settle(self._require(action.module))
        if record.status == "running":
            return
        await self._spawn(record)

    async def _spawn(self, record: ProcessRecord) -> None:
        module = record.module
        mapping = listen_mapping(record.desired)
        port = (mapping.host if mapping else None) or _free_port(record.host)
        instance = uuid.uuid4().hex
        env = self._environment(record, port, instance)
        # The intent first: an agent killed right after the spawn finds this instance on restart.
        record = self._save(replace(record, instance=instance))
        log_path = self._folder(module) / "module.log"
        if log_path.exists() and log_path.stat().st_size > LOG_ROTATE_BYTES:
            os.replace(log_path, log_path.with_suffix(".log.1"))
        with log_path.open("ab") as log:
            log.write(
                f"--- {utcnow().isoformat()} starting {record.image} on {record.host}:{port}\n".encode()
            )
            log.flush()
            try:
                proc = await asyncio.create_subprocess_exec(
                    self.python,
                    "-m",
                    "modules.scoring",
                    cwd=record.image_dir,
                    env=env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as exc:
                now = utcnow().isoformat()
                self._save(replace(record, status="exited", exit_code=127, started_at=now, finished_at=now))
                raise RuntimeActionError(module, f"cannot start {self.python}: {exc}") from None
        self._children[module] = proc
        self._save(
            replace(
                record,
                status="running",
                pid=proc.pid,
                pid_start=proc_start_ticks(proc.pid, self.proc_root),
                port=port,
                started_at=utcnow().isoformat(),
                finished_at=None,
                exit_code=None,
            )
        )
        self._watchers[module] = asyncio.create_task(self._watch(module, proc), name=f"watch {module}")

    async def _watch(self, module: str, proc: asyncio.subprocess.Process) -> None:
        """Record the exit code of a child when it exits."""
        try:
            code = await proc.wait()
            record = self._load(module)
            if record is not None and record.pid == proc.pid:
                self._save(
                    replace(
                        record,
                        status="exited",
                        exit_code=_exit_status(code),
                        finished_at=utcnow().isoformat(),
                    )
                )
        finally:
            if self._children.get(module) is proc:
                del self._children[module]
                self._watchers.pop(module, None)

    async def stop(self, action: Stop) -> None:
        """SIGTERM the module's process group; SIGKILL it after ``stop_timeout_s``."""
        record = await self._settle(self._require(action.module))
        if record.status != "running":
            return
        await self._terminate(record)

    async def _terminate(self, record: ProcessRecord) -> None:
        assert record.pid is not None
        pgid = record.pid
        self._signal_group(pgid, signal.SIGTERM)
        if not await self._wait_gone(record, self.stop_timeout_s):
            self._signal_group(pgid, signal.SIGKILL)
            await self._wait_gone(record, None)
        self._signal_group(pgid, signal.SIGKILL)
        watcher = self._watchers.get(record.module)
        if watcher is not None:
            await asyncio.shield(watcher)
        current = self._require(record.module)
        if current.status == "running":
            self._save(replace(current, status="exited", exit_code=None, finished_at=utcnow().isoformat()))

    @staticmethod
    def _signal_group(pgid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)

    async def _wait_gone(self, record: ProcessRecord, timeout: float | None) -> bool:
        """Wait until the process is gone; False when ``timeout`` passed first."""
        child = self._children.get(record.module)
        if child is not None and child.pid == record.pid:
            try:
                await asyncio.wait_for(asyncio.shield(child.wait()), timeout)
            except asyncio.TimeoutError:
                return False
            return True
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while self._alive(record):
            if deadline is not None and loop.time() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def restart(self, action: Restart) -> None:
        """Stop the module's process if it runs, then start it again."""
        record = await self._settle(self._require(action.module))
        if record.status == "running":
            await self._terminate(record)
            record = self._require(action.module)
        await self._spawn(record)

    async def remove(self, action: Remove) -> None:
        """Stop the module if it runs and delete its record and log."""
        record = await self._settle(self._require(action.module))
        if record.status == "running":
            await self._terminate(record)
        shutil.rmtree(self._folder(action.module))
        self._records.pop(action.module, None)

    async def logs(self, module: str, tail: int = 100) -> str:
        """The last ``tail`` lines of the module's log file."""
        self._require(module)
        return await asyncio.to_thread(tail_lines, self._folder(module) / "module.log", tail)

    async def close(self) -> None:
        """Stop watching (processes keep running and are adopted by the next runtime) and cancel pulls."""
        await self.pulls.close()
        watchers = list(self._watchers.values())
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        self._watchers.clear()
        self._children.clear()

    def records(self) -> Mapping[str, ProcessRecord]:
        """The records as of the last observe or action (for reports and tests)."""
        return dict(self._records)
