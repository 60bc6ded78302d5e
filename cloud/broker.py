"""Mosquitto's password file, ACL file and configuration, generated from the device table.

Files live in ``<data dir>/broker/``:

- ``passwd``: one ``user:$7$iterations$salt$hash`` line per device plus the cloud's own user, in
  exactly ``mosquitto_passwd``'s (2.x) PBKDF2-SHA512 format, so the stock broker reads it;
- ``acl``: ``pattern`` lines with ``%u`` (the username is the device id) that let a device read
  only its own ``desired``, ``cmd/req`` and ``online`` and write only its own ``reported``,
  ``online`` and ``cmd/res``; a ``user`` block for the cloud;
- ``cloud.password``: the cloud user's password in clear (mode 0600; the cloud needs it to connect);
- ``broker.json``: what ``edgectl broker config`` chose (device-facing URL, CA, pid file), so
  ``device add`` can write agent configurations and signal the broker without more flags.

Both Mosquitto files are rewritten whole (atomically) from the database on every change; Mosquitto
rereads them on SIGHUP (:func:`reload_broker`). The access rules themselves come from the topic
scheme (``edgemqtt.topics``).

``resolve_endpoint`` says where the cloud's own MQTT clients connect: ``--broker-url``, else
``$EDGE_BROKER_URL``, else the cloud's URL that ``edgectl broker config`` saved in the data
directory (its loopback listener for the cloud, where client ids are not bound to usernames),
else ``mqtt://127.0.0.1:1883``. Several comma-separated URLs name the nodes of a cluster.
Credentials come from the URL (``mqtt://user:pass@host``) or, when the data directory holds
broker files, are the cloud's own user (``_cloud`` and ``broker/cloud.password``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import hmac
import os
import secrets
import signal
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

from edgemqtt import topics
from edgemqtt.endpoint import Endpoint

BROKER_DIR = "broker"
CLOUD_USER = "_cloud"
"""The cloud's MQTT username: not a valid device id (ids start with a letter or digit)."""
HASH_ITERATIONS = 101
"""``mosquitto_passwd``'s default; passwords are 256-bit random tokens, so more buys nothing."""
SALT_BYTES = 12
HASH_BYTES = 64
PASSWORD_BYTES = 32
DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
DEFAULT_BIND = "127.0.0.1"
BROKER_URL_ENV = "EDGE_BROKER_URL"
DEFAULT_BROKER_URL = f"mqtt://{DEFAULT_BIND}:{DEFAULT_PORT}"
MOSQUITTO_USER = "%u"
"""How Mosquitto's ACL ``pattern`` lines write the client's username (the device id)."""


class BrokerError(Exception):
    """A broker file cannot be written or read, or the broker cannot be signalled; one line."""


# --------------------------------------------------------------------------------------------
# Password hashes in mosquitto_passwd's format
# --------------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, iterations: int = HASH_ITERATIONS, salt: bytes | None = None) -> str:
    """``$7$<iterations>$<base64 salt>$<base64 PBKDF2-SHA512>``, as ``mosquitto_passwd`` writes it."""
    if iterations < 1:
        raise ValueError("iterations must be at least 1")
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, HASH_BYTES)
    return f"$7${iterations}${_b64(salt)}${_b64(digest)}"


def parse_hash(encoded: str) -> tuple[int, bytes, bytes]:
    """``(iterations, salt, digest)`` of a ``$7$`` hash; ValueError naming what is wrong."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[0] != "" or parts[1] != "7":
        raise ValueError("not a mosquitto PBKDF2-SHA512 hash ($7$iterations$salt$hash)")
    if not parts[2].isdigit() or int(parts[2]) < 1:
        raise ValueError(f"bad iteration count {parts[2]!r}")
    try:
        salt = base64.b64decode(parts[3], validate=True)
        digest = base64.b64decode(parts[4], validate=True)
    except ValueError:
        raise ValueError("salt or hash is not base64") from None
    if len(digest) != HASH_BYTES:
        raise ValueError(f"hash has {len(digest)} bytes, PBKDF2-SHA512 gives {HASH_BYTES}")
    return int(parts[2]), salt, digest


def verify_password(password: str, encoded: str) -> bool:
    """Whether ``password`` matches a ``$7$`` hash (constant-time comparison)."""
    iterations, salt, digest = parse_hash(encoded)
    candidate = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, HASH_BYTES)
    return hmac.compare_digest(candidate, digest)


def new_password() -> str:
    """A random URL-safe password with 256 bits of entropy."""
    return secrets.token_urlsafe(PASSWORD_BYTES)


# --------------------------------------------------------------------------------------------
# File contents
# --------------------------------------------------------------------------------------------


def _check_username(user: str) -> None:
    if not user or any(c in user for c in ":\n\r") or user != user.strip():
        raise ValueError(f"{user!r} cannot be a Mosquitto username")


def render_password_file(hashes: Mapping[str, str]) -> str:
    """A password file with one ``user:hash`` line per entry, sorted by user."""
    lines = []
    for user in sorted(hashes):
        _check_username(user)
        parse_hash(hashes[user])
        lines.append(f"{user}:{hashes[user]}")
    return "".join(f"{line}\n" for line in lines)


def parse_password_file(text: str) -> dict[str, str]:
    """``{user: hash}`` from a Mosquitto password file (blank lines and ``#`` comments skipped)."""
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        if not sep:
            raise ValueError(f"line {number}: expected user:hash")
        out[user] = encoded
    return out


def render_acl(cloud_user: str = CLOUD_USER) -> str:
    """The ACL file: device patterns (``%u`` is the device id) and the cloud user's topics."""
    lines = [
        "# Generated by edgectl from the device table; rewritten on every device add/remove.",
        "# Devices (MQTT username = device id) reach only their own topics.",
        *(f"pattern {rule.access} {rule.topic}" for rule in topics.device_acl(MOSQUITTO_USER)),
        "",
        "# The cloud publishes desired states and commands and reads what devices report.",
        f"user {cloud_user}",
        *(f"topic {rule.access} {rule.topic}" for rule in topics.cloud_acl()),
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ListenerOptions:
    """One listener of the generated broker configuration."""

    port: int = DEFAULT_PORT
    bind: str = DEFAULT_BIND
    tls_cert: Path | None = None
    tls_key: Path | None = None
    ca_file: Path | None = None

    @property
    def tls(self) -> bool:
        """Whether the listener serves TLS."""
        return self.tls_cert is not None


def render_mosquitto_conf(
    listener: ListenerOptions,
    *,
    cloud_port: int,
    password_file: Path,
    acl_file: Path,
    persistence_dir: Path,
    pid_file: Path,
    user: str,
) -> str:
    """A complete ``mosquitto.conf``: no anonymous access, password and ACL files, persistence.

    Two listeners share the password and ACL files. Devices use ``listener``, where the client id
    is the username (``use_username_as_clientid``): a device cannot take another's client id and
    knock it off the broker, whatever id it asks for. The cloud's workers connect on loopback at
    ``cloud_port``, where client ids stay their own (several workers share the cloud's user).
    ``user`` is who Mosquitto runs as when started as root (it writes the pid file and persistence
    as that user).
    """
    lines = [
        "# Generated by edgectl broker config. Run: mosquitto -c <this file>",
        "# Reload password and ACL files after device changes: edgectl broker reload (SIGHUP).",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {password_file}",
        f"acl_file {acl_file}",
        "persistence true",
        f"persistence_location {persistence_dir}/",
        f"pid_file {pid_file}",
        f"user {user}",
        "log_dest stderr",
        *(f"log_type {t}" for t in ("error", "warning", "notice", "information")),
        "connection_messages true",
        "",
        "# Devices: the client id is the username, so no device can take over another's session.",
        f"listener {listener.port} {listener.bind}",
        "use_username_as_clientid true",
    ]
    if listener.tls:
        assert listener.tls_key is not None
        lines += [f"certfile {listener.tls_cert}", f"keyfile {listener.tls_key}", "tls_version tlsv1.2"]
        if listener.ca_file is not None:
            lines.append(f"cafile {listener.ca_file}")
    lines += [
        "",
        "# The cloud's workers (loopback only): one user, a client id per worker.",
        f"listener {cloud_port} 127.0.0.1",
    ]
    return "\n".join(lines) + "\n"


def listener_url(listener: ListenerOptions) -> str:
    """The URL devices use for a listener (``localhost`` when it binds every address)."""
    host = "localhost" if listener.bind in ("0.0.0.0", "::", "") else listener.bind
    host = f"[{host}]" if ":" in host else host
    return f"{'mqtts' if listener.tls else 'mqtt'}://{host}:{listener.port}"


# --------------------------------------------------------------------------------------------
# Files on disk
# --------------------------------------------------------------------------------------------


class BrokerSettings(BaseModel):
    """What ``edgectl broker config`` chose, for ``device add`` and ``broker reload``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    """What devices connect to."""
    cloud_url: str | None = None
    """What the cloud's workers connect to (the loopback listener); ``url`` when not set."""
    ca_file: Path | None = None
    pid_file: Path | None = None
    config_file: Path | None = None


@dataclass(frozen=True)
class BrokerPaths:
    """Where one data directory keeps its broker files."""

    root: Path

    @classmethod
    def of(cls, data_dir: Path) -> BrokerPaths:
        """The broker folder of a data directory."""
        return cls(data_dir / BROKER_DIR)

    @property
    def password_file(self) -> Path:
        """Mosquitto's password file."""
        return self.root / "passwd"

    @property
    def acl_file(self) -> Path:
        """Mosquitto's ACL file."""
        return self.root / "acl"

    @property
    def cloud_password_file(self) -> Path:
        """The cloud user's password in clear."""
        return self.root / "cloud.password"

    @property
    def settings_file(self) -> Path:
        """``broker.json``."""
        return self.root / "broker.json"

    @property
    def lock_file(self) -> Path:
        """Serialises changes to the files between edgectl processes."""
        return self.root / ".lock"


def write_atomic(path: Path, text: str, mode: int) -> None:
    """Replace ``path`` with ``text`` (temp file, fsync, rename) so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise BrokerError(f"cannot write {path}: {e.strerror or e}") from None


def _ensure_root(paths: BrokerPaths) -> None:
    try:
        paths.root.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as e:
        raise BrokerError(f"cannot create broker folder {paths.root}: {e.strerror or e}") from None


@contextlib.contextmanager
def locked(paths: BrokerPaths) -> Iterator[None]:
    """Hold the broker folder's lock (one edgectl process at a time changes devices and files)."""
    _ensure_root(paths)
    try:
        fd = os.open(paths.lock_file, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as e:
        raise BrokerError(f"cannot open {paths.lock_file}: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def cloud_credentials(paths: BrokerPaths) -> tuple[str, str]:
    """The cloud's MQTT ``(username, password)``, created on first use (mode 0600)."""
    _ensure_root(paths)
    path = paths.cloud_password_file
    try:
        if not path.exists():
            write_atomic(path, new_password() + "\n", 0o600)
        password = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise BrokerError(f"cannot read {path}: {e.strerror or e}") from None
    if not password:
        raise BrokerError(f"{path} is empty: delete it and run edgectl broker sync to make a new one")
    return CLOUD_USER, password


def resolve_endpoint(data_dir: Path, url: str | None = None) -> Endpoint:
    """The broker endpoint of the cloud's clients for a data directory (see the module docstring).

    ValueError naming the URL when it is malformed; BrokerError when the saved settings are.
    """
    paths = BrokerPaths.of(data_dir)
    saved = load_settings(paths)
    chosen = url or os.environ.get(BROKER_URL_ENV)
    if chosen is not None or saved is None:
        endpoint = Endpoint.parse(chosen or DEFAULT_BROKER_URL, ca_file=saved.ca_file if saved else None)
    elif saved.cloud_url is not None:  # the broker's loopback listener for the cloud
        endpoint = Endpoint.parse(saved.cloud_url)
    else:
        endpoint = Endpoint.parse(saved.url, ca_file=saved.ca_file)
    if endpoint.username is None and paths.cloud_password_file.is_file():
        endpoint = endpoint.with_credentials(*cloud_credentials(paths))
    return endpoint


def write_broker_files(paths: BrokerPaths, device_hashes: Mapping[str, str]) -> None:
    """Rewrite the password file (devices plus the cloud user) and the ACL file."""
    if CLOUD_USER in device_hashes:
        raise BrokerError(f"{CLOUD_USER!r} is the cloud's username and cannot be a device")
    user, password = cloud_credentials(paths)
    hashes = dict(device_hashes)
    existing = _existing_hashes(paths)
    cloud_hash = existing.get(user)
    if cloud_hash is None or not _matches(password, cloud_hash):
        cloud_hash = hash_password(password)
    hashes[user] = cloud_hash
    write_atomic(paths.password_file, render_password_file(hashes), 0o640)
    write_atomic(paths.acl_file, render_acl(user), 0o640)


def _existing_hashes(paths: BrokerPaths) -> dict[str, str]:
    try:
        return parse_password_file(paths.password_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _matches(password: str, encoded: str) -> bool:
    try:
        return verify_password(password, encoded)
    except ValueError:
        return False


def load_settings(paths: BrokerPaths) -> BrokerSettings | None:
    """``broker.json``, or None when ``edgectl broker config`` was never run."""
    path = paths.settings_file
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as e:
        raise BrokerError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        return BrokerSettings.model_validate_json(text)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(document)"
        raise BrokerError(f"{path}: {where}: {first['msg']} (rerun edgectl broker config)") from None


def save_settings(paths: BrokerPaths, settings: BrokerSettings) -> None:
    """Write ``broker.json``."""
    _ensure_root(paths)
    write_atomic(paths.settings_file, settings.model_dump_json(indent=2) + "\n", 0o640)


# --------------------------------------------------------------------------------------------
# Reload
# --------------------------------------------------------------------------------------------


def read_pid(pid_file: Path) -> int:
    """The pid in a pid file; BrokerError when missing, malformed or not a running process."""
    try:
        text = pid_file.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise BrokerError(f"pid file {pid_file} does not exist: is the broker running?") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BrokerError(f"cannot read pid file {pid_file}: {e}") from None
    if not text.isdigit() or int(text) < 1:
        raise BrokerError(f"pid file {pid_file} holds {text[:20]!r}, not a process id")
    pid = int(text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise BrokerError(f"pid file {pid_file} names process {pid}, which is not running") from None
    except PermissionError:
        raise BrokerError(f"not allowed to signal process {pid} (from {pid_file})") from None
    return pid


def reload_broker(pid_file: Path) -> int:
    """Send SIGHUP to the broker in ``pid_file`` (Mosquitto rereads password and ACL files); its pid."""
    pid = read_pid(pid_file)
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as e:
        raise BrokerError(f"cannot signal process {pid} (from {pid_file}): {e.strerror or e}") from None
    return pid
