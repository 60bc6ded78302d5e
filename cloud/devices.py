"""Device provisioning: add, list, show, tag and remove devices, keeping the broker's files in step.

``add`` creates a random MQTT password, stores only its Mosquitto hash, rewrites the broker's
password and ACL files and writes a ready agent configuration folder (``agent.yaml`` with the
password, mode 0600; the cloud's public signing key; the broker's CA for TLS). The password exists
in clear only in that file (and in the result, shown only for ``--show-password``). ``remove`` deletes the row
and rewrites the files, so after a reload the device can no longer connect; in the same transaction
it deletes the device's fleet rows and, when the device could have left retained MQTT messages,
records that they must be cleared (``clear_removed`` does it, or the next publisher run; see
``cloud.fleet.removal``).

Changes and file rewrites happen under the broker folder's lock and inside one transaction: the
files always match the committed table.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from cloud import broker
from cloud.broker_rabbitmq import rabbit_password_hash
from cloud.config import Settings
from cloud.fleet.device_state import DeviceState, device_states
from cloud.fleet.removal import ClearReport, clear_removed, forget_device, is_clear_pending
from cloud.fleet.sql import aware
from cloud.keys import PUBLIC_KEY_FILE, public_key_bytes
from cloud.store.db import Database, open_database
from cloud.store.devices import Device, DeviceTag, find_devices, password_hashes
from cloud.store.errors import AlreadyExistsError, InvalidInputError, NotFoundError
from cloud.store.refs import check_name
from cloud.store.registry import check_tags
from edgemqtt.endpoint import Endpoint, split_urls
from modules.contract import utcnow
from modules.profiles import ProfileError, get_profile
from modules.sealing import new_key_pair

DEVICES_DIR = "devices"
AGENT_CONFIG_FILE = "agent.yaml"
CA_FILE = "ca.pem"
DEFAULT_PROFILE = "cpu"
DEFAULT_STATE_DIR = "/var/lib/edge-agent"
Runtime = Literal["docker", "process"]


class DeviceView(BaseModel):
    """A device as the CLI and API show it (never its password or hash)."""

    model_config = ConfigDict(frozen=True)

    id: str
    profile: str
    tags: dict[str, str]
    created_at: datetime
    updated_at: datetime
    state: DeviceState | None = None
    """What the fleet knows of it now (``device list``/``show`` and ``GET /devices`` fill it in)."""


class Provisioned(BaseModel):
    """A provisioned device, as ``add`` returns it and ``device add --json`` and the API show it.

    ``add`` fills in the MQTT password in clear; show it only when asked (``without_password``
    otherwise). ``broker`` says what became of the broker afterwards (reloaded, or how to).
    """

    model_config = ConfigDict(frozen=True)

    device: DeviceView
    config_file: Path
    broker_url: str
    password: str | None = Field(
        default=None, repr=False, description="the device's MQTT password, only when asked for (shown once)"
    )
    broker: str = Field(default="", description="whether the broker was reloaded, or how to reload it")

    def without_password(self) -> Provisioned:
        """This result with the password left out."""
        return self.model_copy(update={"password": None})


@dataclass(frozen=True)
class AgentBundle:
    """Where and how to write a new device's agent configuration."""

    out_dir: Path | None = None
    """Default: ``<data dir>/devices/<id>``."""
    broker_url: str | None = None
    """Default: the URL ``edgectl broker config`` recorded, else ``mqtt://127.0.0.1:1883``."""
    ca_file: Path | None = None
    """Default: the CA ``edgectl broker config`` recorded (copied into the folder as ``ca.pem``)."""
    state_dir: str = DEFAULT_STATE_DIR
    runtime: Runtime = "docker"
    force: bool = False
    """Overwrite an existing ``agent.yaml``."""


def check_device_id(device_id: str) -> str:
    """``device_id`` if it follows the contract's Name rules (so it is a safe MQTT username)."""
    return check_name(device_id, "device id")


def check_profile(profile: str) -> str:
    """``profile`` if a device profile of that name exists."""
    try:
        get_profile(profile)
    except ProfileError as e:
        raise InvalidInputError(str(e).splitlines()[0]) from None
    return profile


def check_broker_url(url: str) -> str:
    """``url`` if it names broker nodes without credentials (``mqtt[s]://host[:port]``, comma-separated)."""
    try:
        Endpoint.parse(url, credentials_in_url=False)
    except ValueError as e:
        raise InvalidInputError(str(e)) from None
    return url


def _exists(device_id: str) -> AlreadyExistsError:
    return AlreadyExistsError(
        f"device {device_id!r} already exists (edgectl device remove {device_id} first "
        "to provision it again with new credentials)"
    )


def _not_cleared(device_id: str) -> AlreadyExistsError:
    return AlreadyExistsError(
        f"device {device_id!r} was removed, but the broker has not yet cleared its retained messages "
        "(it was unreachable); run 'edgectl deploy publish' (or let 'deploy watch' / 'edgectl serve' "
        "do it), then add the device again"
    )


def _view(device: Device, state: DeviceState | None = None) -> DeviceView:
    return DeviceView(
        id=device.id,
        profile=device.profile,
        tags=device.tag_dict,
        created_at=aware(device.created_at),
        updated_at=aware(device.updated_at),
        state=state,
    )


def _write_private(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class DeviceManager:
    """Provisioning operations on one data directory and database."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.paths = broker.BrokerPaths.of(settings.data_dir)

    @classmethod
    def open(cls, settings: Settings) -> DeviceManager:
        """Open the database of ``settings``."""
        return cls(settings, open_database(settings.db_url))

    def close(self) -> None:
        """Release the database connections."""
        self.db.dispose()

    def default_bundle_dir(self, device_id: str) -> Path:
        """Where ``add`` writes a device's agent configuration unless told otherwise."""
        return self.settings.data_dir / DEVICES_DIR / device_id

    @contextmanager
    def _change(self) -> Iterator[Session]:
        """A transaction under the broker lock; the broker files are rewritten before it commits."""
        with broker.locked(self.paths), self.db.transaction() as session:
            yield session
            session.flush()
            broker.write_broker_files(self.paths, password_hashes(session))

    def _get(self, session: Session, device_id: str) -> Device:
        device = session.get(Device, device_id, options=[selectinload(Device.tags)])
        if device is None:
            raise NotFoundError(f"device {device_id!r} does not exist")
        return device

    def add(
        self,
        device_id: str,
        *,
        profile: str = DEFAULT_PROFILE,
        tags: Mapping[str, str] | None = None,
        bundle: AgentBundle | None = None,
        endpoint: Endpoint | None = None,
    ) -> Provisioned:
        """Provision a device: credentials, broker files, agent configuration folder.

        An id removed earlier whose retained messages are not cleared yet is refused, after one
        more try at clearing them through ``endpoint`` (the cloud's broker) when given.
        """
        check_device_id(device_id)
        check_profile(profile)
        tags = check_tags(tags or {})
        bundle = bundle or AgentBundle()
        with self.db.transaction() as session:
            if session.get(Device, device_id) is not None:
                raise _exists(device_id)
            pending = is_clear_pending(session, device_id)
        if pending and (endpoint is None or device_id not in self.clear_removed(endpoint).cleared):
            raise _not_cleared(device_id)
        recorded = broker.load_settings(self.paths)
        url = check_broker_url(
            bundle.broker_url
            or (recorded.url if recorded else f"mqtt://{broker.DEFAULT_BIND}:{broker.DEFAULT_PORT}")
        )
        ca_file = bundle.ca_file or (recorded.ca_file if recorded else None)
        tls = Endpoint.parse(url).tls
        if ca_file is not None and not tls:
            raise InvalidInputError(f"--ca {ca_file}: a CA needs TLS; use an mqtts:// broker URL")
        if ca_file is not None and not ca_file.is_file():
            raise InvalidInputError(f"--ca {ca_file}: no such file")
        out_dir = bundle.out_dir or self.default_bundle_dir(device_id)
        config_file = out_dir / AGENT_CONFIG_FILE
        if config_file.exists() and not bundle.force:
            raise InvalidInputError(f"{config_file} already exists (use --force to overwrite it)")
        password = broker.new_password()
        public_pem = public_key_bytes(self.settings.data_dir)
        written: list[Path] = []
        try:
            view = self._insert(
                device_id, profile, tags, password, bundle, out_dir, url, ca_file, public_pem, written
            )
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return Provisioned(device=view, config_file=config_file, broker_url=url, password=password)

    def _insert(
        self,
        device_id: str,
        profile: str,
        tags: Mapping[str, str],
        password: str,
        bundle: AgentBundle,
        out_dir: Path,
        url: str,
        ca_file: Path | None,
        public_pem: bytes,
        written: list[Path],
    ) -> DeviceView:
        with self._change() as session:
            if session.get(Device, device_id) is not None:
                raise _exists(device_id)
            if is_clear_pending(session, device_id):
                raise _not_cleared(device_id)
            sealing_private, sealing_public = new_key_pair()
            device = Device(
                id=device_id,
                profile=profile,
                password_hash=broker.hash_password(password),
                rabbitmq_password_hash=rabbit_password_hash(password),
                sealing_public_key=sealing_public,
            )
            device.tags = [DeviceTag(key=k, value=v) for k, v in sorted(tags.items())]
            session.add(device)
            try:
                session.flush()
            except IntegrityError:
                raise _exists(device_id) from None
            self._write_bundle(
                device_id, out_dir, url, ca_file, password, sealing_private, public_pem, bundle
            )
            written.append(out_dir / AGENT_CONFIG_FILE)
            return _view(device)

    def _write_bundle(
        self,
        device_id: str,
        out_dir: Path,
        url: str,
        ca_file: Path | None,
        password: str,
        sealing_key: str,
        public_pem: bytes,
        bundle: AgentBundle,
    ) -> None:
        first, *others = split_urls(url)
        broker_section: dict[str, Any] = {"url": first}
        if others:
            broker_section["failover_urls"] = others
        broker_section |= {"username": device_id, "password": password}
        if ca_file is not None:
            broker_section["ca_file"] = CA_FILE
        config = {
            "device_id": device_id,
            "broker": broker_section,
            "cloud_public_key": PUBLIC_KEY_FILE,
            "state_dir": bundle.state_dir,
            "runtime": bundle.runtime,
            "sealing_key": sealing_key,
        }
        header = (
            f"# edge-agent configuration for device {device_id}, written by edgectl device add.\n"
            "# It holds the device's MQTT password and the key that opens registry credentials sealed to\n"
            "# it: keep it mode 0600 and copy it only to the device.\n"
        )
        try:
            out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            _write_private(out_dir / PUBLIC_KEY_FILE, public_pem, 0o644)
            if ca_file is not None:
                _write_private(out_dir / CA_FILE, ca_file.read_bytes(), 0o644)
            text = header + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
            _write_private(out_dir / AGENT_CONFIG_FILE, text.encode("utf-8"), 0o600)
        except OSError as e:
            raise broker.BrokerError(
                f"cannot write the agent configuration to {out_dir}: {e.strerror or e}"
            ) from None

    def list_devices(
        self, *, tags: Mapping[str, str] | None = None, profiles: Iterable[str] | None = None
    ) -> list[DeviceView]:
        """Devices with all ``tags`` and one of ``profiles`` (every device by default), by id."""
        with self.db.transaction() as session:
            devices = find_devices(session, tags=tags, profiles=profiles)
            states = device_states(session, (d.id for d in devices), utcnow())
            return [_view(d, states.get(d.id)) for d in devices]

    def show(self, device_id: str) -> DeviceView:
        """One device."""
        check_device_id(device_id)
        with self.db.transaction() as session:
            device = self._get(session, device_id)
            return _view(device, device_states(session, [device.id], utcnow())[device.id])

    def tag(self, device_id: str, set_tags: Mapping[str, str], remove: Iterable[str] = ()) -> DeviceView:
        """Set and remove tags of a device; removing a tag it does not have is an error."""
        check_device_id(device_id)
        set_tags = check_tags(set_tags)
        remove = list(remove)
        if not set_tags and not remove:
            raise InvalidInputError("nothing to change: give KEY=VALUE tags to set or --remove KEY")
        both = sorted(set(set_tags) & set(remove))
        if both:
            raise InvalidInputError(f"tag {both[0]!r} is both set and removed")
        with self.db.transaction() as session:
            device = self._get(session, device_id)
            current = {t.key: t for t in device.tags}
            for key in remove:
                if key not in current:
                    raise InvalidInputError(f"device {device_id!r} has no tag {key!r}")
                device.tags.remove(current.pop(key))
            for key, value in set_tags.items():
                if key in current:
                    current[key].value = value
                else:
                    device.tags.append(DeviceTag(key=key, value=value))
            device.updated_at = utcnow()
            session.flush()
            session.refresh(device)
            return _view(device)

    def remove(self, device_id: str) -> DeviceView:
        """Delete a device, its credentials and fleet rows; its default agent configuration folder goes too.

        Its retained MQTT messages are left pending for ``clear_removed`` (see the module docstring).
        """
        check_device_id(device_id)
        with self._change() as session:
            device = self._get(session, device_id)
            view = _view(device)
            session.delete(device)
            forget_device(session, device_id)
        shutil.rmtree(self.default_bundle_dir(device_id), ignore_errors=True)
        return view

    def clear_removed(self, endpoint: Endpoint) -> ClearReport:
        """Clear the retained messages of removed devices on the broker (never raises for the broker)."""
        return clear_removed(self.db, endpoint)

    def sync_broker_files(self) -> broker.BrokerPaths:
        """Rewrite the password and ACL files from the table (after a restore, or a deleted file)."""
        with self._change():
            pass
        return self.paths


def reload_if_configured(paths: broker.BrokerPaths) -> str:
    """SIGHUP the broker when ``broker config`` recorded a pid file; a line saying what happened."""
    recorded = broker.load_settings(paths)
    if recorded is None or recorded.pid_file is None:
        return (
            "broker files updated; reload the broker: edgectl broker reload --pid-file FILE "
            "(or send SIGHUP to mosquitto)"
        )
    if not recorded.pid_file.exists():
        return f"broker files updated; no broker running (no {recorded.pid_file}): it reads them on start"
    pid = broker.reload_broker(recorded.pid_file)
    return f"broker reloaded (SIGHUP to pid {pid})"
