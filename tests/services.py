"""Real services for integration tests: Mosquitto, a CNCF distribution registry, Docker Engine.

Each service runs as a child process on a free port on 127.0.0.1, in its own directory, logging to
a file there. When a service cannot start, a :class:`ServiceUnavailable` says why, how to fix it
and what the service logged; :func:`start_or_skip` turns that into a loud ``pytest.skip`` and
records the outcome for the end-of-run summary (see ``tests/conftest.py``).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERD_LOG = REPO_ROOT / ".work" / "dockerd.log"
PARTS = ("mosquitto", "registry", "docker", "postgresql", "rabbitmq")

T = TypeVar("T")


class ServiceUnavailable(Exception):
    """A real service could not be started or reached; ``reason`` says why and how to fix it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def free_port(host: str = HOST) -> int:
    """Return a TCP port on ``host`` that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (outgoing connections take ports from there)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def fixed_port(host: str = HOST) -> int:
    """A free TCP port below the kernel's ephemeral range, for a service that must get the same port
    back after a restart: the outgoing connections of a big simulated fleet take ephemeral ports,
    and one could hold a port ``free_port`` gave out while its service was down."""
    low = ephemeral_low()
    for _ in range(200):
        port = random.randrange(10_000, max(low, 10_001))
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                continue
        return port
    return free_port(host)


def port_open(host: str, port: int) -> bool:
    """Whether a TCP connection to ``host:port`` succeeds."""
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def http_status(url: str) -> int | None:
    """HTTP status of ``GET url``, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2.0) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except (OSError, ValueError):
        return None


def wait_until(check: Callable[[], bool], timeout_s: float, alive: Callable[[], bool] = lambda: True) -> bool:
    """Poll ``check`` until it is true (True), ``timeout_s`` passes or ``alive`` turns false (False)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        if not alive():
            return False
        time.sleep(0.05)
    return check()


def wait_for_port(host: str, port: int, timeout_s: float = START_TIMEOUT_S) -> bool:
    """Wait until ``host:port`` accepts TCP connections."""
    return wait_until(lambda: port_open(host, port), timeout_s)


def wait_for_http(url: str, timeout_s: float = START_TIMEOUT_S, status: int = 200) -> bool:
    """Wait until ``GET url`` answers with ``status``."""
    return wait_until(lambda: http_status(url) == status, timeout_s)


def find_binary(name: str) -> str | None:
    """Path of executable ``name`` on PATH or in the sbin folders Debian puts daemons in."""
    extra = os.pathsep.join(["/usr/local/sbin", "/usr/sbin", "/sbin"])
    return shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + extra)


def log_tail(path: Path, lines: int = 12) -> str:
    """The last ``lines`` lines of a log file on one line, for skip reasons."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(tail) if tail else f"(empty log {path})"


class ManagedProcess:
    """A service run as a child process with its output in ``<workdir>/<name>.log``.

    Subclasses provide ``argv()`` and ``ready()``. ``start`` raises :class:`ServiceUnavailable`
    when the process exits or is not ready within ``START_TIMEOUT_S``.
    """

    name = "service"
    install_hint = ""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir = workdir
        self.host = HOST
        self.port = port if port is not None else free_port()
        self.log_path = workdir / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        """The command line that runs the service in the foreground."""
        raise NotImplementedError

    def ready(self) -> bool:
        """Whether the service answers requests."""
        raise NotImplementedError

    @property
    def running(self) -> bool:
        """Whether the process was started and has not exited."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> None:
        """Start the service on ``self.port`` and wait until it is ready."""
        if self.running:
            return
        argv = self.argv()
        with self.log_path.open("ab") as log:
            log.write(f"--- starting: {' '.join(argv)}\n".encode())
            log.flush()
            self._process = subprocess.Popen(
                argv,
                cwd=self.workdir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait_until(lambda: self.running and self.ready(), START_TIMEOUT_S, alive=lambda: self.running):
            return
        exited = self._process.poll()
        self.stop()
        state = (
            f"exited with code {exited}" if exited is not None else f"not ready after {START_TIMEOUT_S:.0f}s"
        )
        raise ServiceUnavailable(
            f"{self.name} on {self.host}:{self.port} {state}; log {self.log_path}: {log_tail(self.log_path)}"
        )

    def stop(self) -> None:
        """Stop the service (SIGTERM, then SIGKILL) and wait for it to exit."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def restart(self) -> None:
        """Stop the service and start it again on the same port."""
        self.stop()
        self.start()


def _require_binary(name: str, package: str) -> str:
    path = find_binary(name)
    if path is None:
        raise ServiceUnavailable(
            f"{name} not installed: apt-get install {package} (or run: bash scripts/bootstrap.sh)"
        )
    return path


class MosquittoBroker(ManagedProcess):
    """A Mosquitto broker with a generated configuration and persistence in its own directory.

    ``allow_anonymous`` defaults to true unless a ``password_file`` is given. ``conf_extra`` is
    appended verbatim to the generated ``mosquitto.conf``.
    """

    name = "mosquitto"

    def __init__(
        self,
        workdir: Path,
        conf_extra: str = "",
        password_file: Path | None = None,
        acl_file: Path | None = None,
        allow_anonymous: bool | None = None,
        persistence: bool = True,
        port: int | None = None,
    ) -> None:
        super().__init__(workdir, port)
        self.binary = _require_binary("mosquitto", "mosquitto")
        self.conf_path = workdir / "mosquitto.conf"
        anonymous = password_file is None if allow_anonymous is None else allow_anonymous
        lines = [
            f"listener {self.port} {self.host}",
            f"allow_anonymous {'true' if anonymous else 'false'}",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {workdir}/",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if os.geteuid() == 0:
            lines.append("user root")
        if password_file is not None:
            lines.append(f"password_file {Path(password_file).resolve()}")
        if acl_file is not None:
            lines.append(f"acl_file {Path(acl_file).resolve()}")
        self.conf_path.write_text("\n".join(lines) + "\n" + conf_extra.strip() + "\n")

    def argv(self) -> list[str]:
        return [self.binary, "-c", str(self.conf_path)]

    def ready(self) -> bool:
        return port_open(self.host, self.port)


MosquittoFactory = Callable[..., MosquittoBroker]
"""Type of the ``mosquitto_factory`` fixture: ``(conf_extra, password_file, acl_file, **options)``."""


class RegistryServer(ManagedProcess):
    """A CNCF distribution registry (``docker-registry``) with filesystem storage in its directory."""

    name = "registry"

    def __init__(self, workdir: Path, port: int | None = None, users: dict[str, str] | None = None) -> None:
        """``users`` (username → password): require HTTP basic auth, from an htpasswd (bcrypt) file."""
        super().__init__(workdir, port)
        self.binary = _require_binary("docker-registry", "docker-registry")
        self.config_path = workdir / "config.yml"
        self.users = users
        storage = workdir / "storage"
        storage.mkdir(exist_ok=True)
        auth = ""
        if users:
            import bcrypt

            htpasswd = workdir / "htpasswd"
            htpasswd.write_text(
                "".join(
                    f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=5)).decode()}\n"
                    for u, p in users.items()
                )
            )
            auth = f"auth:\n  htpasswd:\n    realm: edgedeploy-test\n    path: {htpasswd}\n"
        self.config_path.write_text(
            "version: 0.1\n"
            "log:\n  level: info\n  formatter: text\n"
            "storage:\n"
            f"  filesystem:\n    rootdirectory: {storage}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}:{self.port}\n" + auth
        )

    @property
    def address(self) -> str:
        """``host:port``, the prefix of image references in this registry."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """Base URL of the registry API, e.g. ``http://127.0.0.1:5000``."""
        return f"http://{self.address}"

    def argv(self) -> list[str]:
        return [self.binary, "serve", str(self.config_path)]

    def ready(self) -> bool:
        return http_status(f"{self.url}/v2/") == (401 if self.users else 200)


def connect_docker() -> Any:
    """A ``docker.DockerClient`` for the local engine, or :class:`ServiceUnavailable` with the reason."""
    try:
        import docker
    except ImportError as error:
        raise ServiceUnavailable(f"docker SDK not importable ({error}): pip install docker") from error
    try:
        client = docker.from_env(timeout=60)
        client.ping()
    except Exception as error:
        hint = f"dockerd log {DOCKERD_LOG}: {log_tail(DOCKERD_LOG)}" if DOCKERD_LOG.exists() else ""
        raise ServiceUnavailable(
            f"Docker Engine is not answering ({type(error).__name__}: {error}); start it with "
            f"bash scripts/bootstrap.sh (runs dockerd as root). {hint}".strip()
        ) from error
    return client


class ServiceLedger:
    """Which real parts ran or were skipped in this pytest session."""

    def __init__(self) -> None:
        self.ran: set[str] = set()
        self.skipped: dict[str, str] = {}

    def summary(self) -> str:
        """One line: ``real services: mosquitto=ran registry=skipped (reason) docker=not used``."""
        states = []
        for part in PARTS:
            if part in self.ran and part in self.skipped:
                state = f"ran (one start skipped: {self.skipped[part]})"
            elif part in self.ran:
                state = "ran"
            elif part in self.skipped:
                state = f"skipped ({self.skipped[part]})"
            else:
                state = "not used"
            states.append(f"{part}={state}")
        return "real services: " + " ".join(states)


LEDGER_KEY = pytest.StashKey[ServiceLedger]()


def ledger(config: pytest.Config) -> ServiceLedger:
    """The session's :class:`ServiceLedger`, created on first use."""
    if LEDGER_KEY not in config.stash:
        config.stash[LEDGER_KEY] = ServiceLedger()
    return config.stash[LEDGER_KEY]


def start_or_skip(config: pytest.Config, part: str, start: Callable[[], T]) -> T:
    """Run ``start`` and record ``part`` as ran; on :class:`ServiceUnavailable`, record and skip loudly."""
    try:
        result = start()
    except ServiceUnavailable as error:
        ledger(config).skipped.setdefault(part, error.reason)
        pytest.skip(f"REAL PART UNAVAILABLE: {part}: {error.reason}")
    ledger(config).ran.add(part)
    return result
