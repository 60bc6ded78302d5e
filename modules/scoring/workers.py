"""Several server processes on one port (``SCORING_WORKERS``): a supervisor and its workers.

One Python process serves HTTP on one event loop, and its inference threads compete with that
loop for the interpreter lock. With N workers, each is a complete server (its own loop, batcher
and ``SCORING_THREADS // N`` inference threads) and the CPUs work in parallel without handing
requests between threads.

The supervisor (the process the container or agent started) binds the port itself, so a port
in use is still exit status 2, then starts the workers, each with a listening socket of its own
inherited. The sockets share the port with ``SO_REUSEPORT``, so the kernel spreads new
connections over the workers. One shared socket would let the first worker to wake accept every
connection of a burst: keep-alive clients would then all stay on one worker. Before binding them
the supervisor binds the port once without ``SO_REUSEPORT``, so a port already in use, even by
another server using ``SO_REUSEPORT``, fails there instead of being joined silently. The supervisor
closes its copy of each socket once that worker has started: left open, it would stay in the
reuseport group after the worker exits and the connections the kernel gives it would hang.

It forwards SIGTERM/SIGINT to the workers and exits when they have stopped. When a
worker exits on its own, the supervisor stops the others and exits with that worker's status
(3 when loading the model failed), so the agent's restart policy sees one module, as with one
process. A worker whose event loop stops (its heartbeat file, ``siblings.py``, unchanged for
``WORKER_STUCK_S`` on the supervisor's monotonic clock, ``Heartbeats``) is killed and the server
exits with status 1: its share of the connections would hang while health probes that reach the
other workers pass. Workers end with the supervisor
(``PR_SET_PDEATHSIG``) even if it is killed: at once (SIGKILL), as one process killed would; a
graceful stop is the supervisor's SIGTERM. A worker is given its supervisor's pid: the supervisor
may be pid 1 (a container without an init).

``auto`` (the default) means one worker per CPU for no-code modules whose profile runs on the
CPU, and 1 for entry scripts (``init()`` may hold a device or assume it runs once, as azureml's
default of one worker does) and accelerators (one device, one set of sessions).
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from modules.scoring.config import EXIT_CONFIG, WORKER_ENV, ServerConfig, WorkerSlot

log = logging.getLogger("modules.scoring")

WORKER_STUCK_S = 15.0
"""A worker whose event loop has not touched its heartbeat file for this long is stuck: it is killed
and the server exits (status 1), so the agent restarts the module."""
STOP_GRACE_S = 8.0
"""After forwarding SIGTERM, how long workers get before SIGKILL (each gives requests 5 s)."""
_PR_SET_PDEATHSIG = 1


def worker_count(config: ServerConfig) -> int:
    """Worker processes for ``config``: the setting, else one per CPU for no-code CPU profiles, else 1."""
    if config.workers is not None:
        return config.workers
    if config.mode != "no-code" or not _runs_on_cpu(config):
        return 1
    return config.threads


def _runs_on_cpu(config: ServerConfig) -> bool:
    """Whether the profile's first choice runs on the CPU (an unknown profile: no; the worker says why)."""
    from modules.profiles import ProfileError, get_profile

    try:
        profile = get_profile(config.profile, config.profiles_dir)
    except ProfileError:
        return False
    if profile.onnxruntime is not None and profile.backend == "onnxruntime":
        return profile.onnxruntime.providers[0].name == "CPUExecutionProvider"
    if profile.openvino is not None and profile.backend == "openvino":
        return profile.openvino.device == "CPU"
    return False


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent (the supervisor, ``parent_pid``) dies, so
    a supervisor killed outright takes its workers with it at once (a graceful stop is SIGTERM,
    which the supervisor forwards); elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    # The supervisor died before prctl took effect: this process was re-parented. Compared with
    # the supervisor's pid, not with 1: in a container without an init the supervisor is pid 1.
    if os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGKILL)


def _socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def listen_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """One listening socket per worker on ``host:port`` (``SO_REUSEPORT``: the kernel spreads new
    connections over them); OSError when the port is in use, even by another SO_REUSEPORT server."""
    _socket(host, port, reuse_port=False).close()  # in use (by anyone): fail here, join nothing
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = _socket(host, port, reuse_port=True)
            sockets.append(sock)
            sock.listen(1024)
            sock.set_inheritable(True)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def supervise(config: ServerConfig, count: int, argv: Sequence[str]) -> int:
    """Bind the port, run ``count`` workers (``python -m modules.scoring argv``), return the exit status."""
    try:
        run_dir = Path(tempfile.mkdtemp(prefix="edge-score-"))
    except OSError as exc:
        log.error(
            "%d workers need a writable temporary folder (TMPDIR): %s; or set SCORING_WORKERS=1", count, exc
        )
        return EXIT_CONFIG
    try:
        sockets = listen_sockets(config.host, config.port, count)
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.host, config.port, exc)
        shutil.rmtree(run_dir, ignore_errors=True)
        return EXIT_CONFIG
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for index in range(1, count + 1):
            sock = sockets[index - 1]
            slot = WorkerSlot(index, count, sock.fileno(), os.getpid(), run_dir)
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "modules.scoring", *argv],
                    env={**os.environ, WORKER_ENV: slot.env_value()},
                    pass_fds=(sock.fileno(),),
                )
            )
            # The worker holds its own copy. Kept open here, the socket would stay in the
            # SO_REUSEPORT group after its worker exits, and the connections the kernel
            # hands to it would wait unanswered.
            sock.close()
        log.info(
            "scoring supervisor: %d worker processes on %s:%s, %d inference thread(s) each, pids %s",
            count,
            config.host,
            config.port,
            max(1, config.threads // count),
            ",".join(str(p.pid) for p in procs),
        )
        code = _wait(procs, stop, run_dir)
    finally:
        _stop(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for sock in sockets:
            sock.close()
        shutil.rmtree(run_dir, ignore_errors=True)
    log.info("scoring supervisor stopping exit_code=%d", code)
    return code


def _wait(procs: list[subprocess.Popen[bytes]], stop: threading.Event, run_dir: Path) -> int:
    """0 after a signal, the status of the first worker that exited on its own, or 1 when one is stuck."""
    heartbeats = Heartbeats()
    while not stop.wait(0.2):
        for index, proc in enumerate(procs, 1):
            code = proc.poll()
            if code is not None:
                code = 128 - code if code < 0 else code  # killed by signal N: 128 + N, as Docker says
                log.error("worker %d/%d (pid %d) exited with %d; stopping", index, len(procs), proc.pid, code)
                return code
            silent = heartbeats.silent_for(index, _mtime(run_dir / f"worker-{index}.alive"), time.monotonic())
            if silent > WORKER_STUCK_S:
                log.error(
                    "worker %d/%d (pid %d): its event loop has not run for %.0f s; killing it, stopping",
                    index,
                    len(procs),
                    proc.pid,
                    silent,
                )
                proc.kill()
                return 1
    return 0


class Heartbeats:
    """How long each worker's heartbeat file has gone untouched, judged on the supervisor's
    monotonic clock: a file's mtime is only compared with its previous value, never with the wall
    clock, so a clock step (NTP setting the time after boot on a device without an RTC) stops no
    worker."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[float, float]] = {}
        """Worker index: (the mtime last seen, the monotonic time it was first seen)."""

    def silent_for(self, worker: int, mtime: float | None, now: float) -> float:
        """Seconds (``now`` on the monotonic clock) since ``worker``'s heartbeat file last changed,
        given its current ``mtime`` (None: not written yet); 0 before its first beat and when the
        mtime just changed."""
        if mtime is None:
            return 0.0
        seen = self._seen.get(worker)
        if seen is None or seen[0] != mtime:
            self._seen[worker] = (mtime, now)
            return 0.0
        return max(0.0, now - seen[1])


def _mtime(path: Path) -> float | None:
    """The file's modification time, None when it does not exist (yet)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return None


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM every worker still running, SIGKILL those not gone after ``STOP_GRACE_S``."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker pid %d did not stop in %g s; killing it", proc.pid, STOP_GRACE_S)
            proc.kill()
            proc.wait()
