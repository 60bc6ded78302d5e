"""The agent's configuration file (e.g. ``/etc/edge-agent/agent.yaml``).

One YAML document, validated strictly (unknown keys, duplicate keys and YAML 1.1 surprises are
errors)::

    device_id: pump-17
    broker:
      url: mqtts://broker.example.com:8883
      password_file: secrets/mqtt-password     # username defaults to the device id
      ca_file: ca.pem
    cloud_public_key: cloud-signing.pub
    state_dir: /var/lib/edge-agent
    runtime: docker
    health_start_period_s: 120
    registry_secrets:
      site-registry: {username: puller, password_file: secrets/registry}
    pull:
      method: resumable          # or engine: Docker Engine's own pull
      max_bytes_per_s: 32768     # the device's bandwidth budget for pulls (absent: no limit)
      window: "01:00-05:00"      # pulls start only inside this daily UTC window (absent: any time)

``images_dir`` (where the process runtime finds unpacked modules) defaults to
``<state_dir>/images``. Relative paths are resolved against the folder of the file.
``load_agent_config`` reports every problem as ``<file>: <field.path>: <message>``. Secrets are
``SecretStr`` (never printed) or read from files when the link or the runtime needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, TypeVar

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from agent.health import DEFAULT_START_PERIOD_S
from agent.planner import PlannerConfig
from agent.restart import BackoffConfig, RestartPolicyConfig
from agent.runtime.blobs import BlobStore
from agent.runtime.image_gc import BOOK_FILE, ImageBook
from agent.runtime.pull_policy import TokenBucket, UpdateWindow
from agent.runtime.pulls import PullTracker
from agent.runtime.registry_pull import RegistryPuller
from edgemqtt.endpoint import Endpoint, parse_url
from edgemqtt.session import SessionOptions
from modules.contract import Name
from modules.documents import DocumentError, load_model_file, read_text
from modules.sealing import SealingError, load_private

BLOBS_DIR = "blobs"
"""Under ``state_dir``: the resumable puller's blob store."""
FOLDER_FIELDS = frozenset({"state_dir", "images_dir"})
"""Path fields that name folders (checked to be folders when they exist, never required)."""

S = TypeVar("S", bound=BaseModel)


class _Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _read_secret(value: SecretStr | None, path: Path | None) -> str | None:
    if value is not None:
        return value.get_secret_value()
    if path is not None:
        return read_text(path).rstrip("\r\n")
    return None


class BrokerConfig(_Settings):
    """How the agent reaches its MQTT broker: URL, protocol, credentials, TLS and reconnect back-off."""

    url: str = Field(description="mqtt://host[:port] (plain) or mqtts://host[:port] (TLS)")
    failover_urls: list[str] = Field(
        default_factory=list,
        description="other nodes of the broker's cluster, tried in turn after url when a connection fails",
    )
    protocol: Literal["mqttv5", "mqttv311"] = "mqttv5"
    client_id: str | None = Field(default=None, min_length=1, description="defaults to the device id")
    username: str | None = Field(default=None, min_length=1, description="defaults to the device id")
    password: SecretStr | None = None
    password_file: Path | None = None
    ca_file: Path | None = Field(default=None, description="CA bundle; the system's when not given")
    client_cert: Path | None = None
    client_key: Path | None = None
    keepalive_s: int = Field(
        default=135,
        ge=5,
        le=65535,
        description="MQTT keep-alive; the broker declares the device offline after 1.5x this without "
        "traffic. Above heartbeat_s, heartbeats replace the pings",
    )
    reconnect_min_s: int = Field(default=1, ge=1, le=3600)
    reconnect_max_s: int = Field(default=60, ge=1, le=86400)
    max_queued_messages: int = Field(
        default=100, ge=10, le=100_000, description="cap on outgoing messages held while offline"
    )
    subscribe_qos: Literal[0, 1] = Field(
        default=1,
        description="QoS of the agent's subscriptions; 0 on brokers that lose a QoS 1 subscription's queue "
        "with the node it lived on (RabbitMQ 3.10 clusters): the agent announces its generation on every "
        "session and the cloud re-sends what it missed",
    )

    @field_validator("url")
    @classmethod
    def _broker_url(cls, v: str) -> str:
        parse_url(v, credentials=False)
        return v

    @field_validator("failover_urls")
    @classmethod
    def _failover_urls(cls, v: list[str]) -> list[str]:
        for url in v:
            parse_url(url, credentials=False)
        return v

    @model_validator(mode="after")
    def _consistent(self) -> BrokerConfig:
        if self.password is not None and self.password_file is not None:
            raise ValueError("give password or password_file, not both")
        if (self.client_cert is None) != (self.client_key is None):
            raise ValueError("client_cert and client_key go together: give both or neither")
        if not self.tls and (self.ca_file or self.client_cert):
            raise ValueError("ca_file and client_cert need TLS: use an mqtts:// URL")
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError(
                f"reconnect_max_s ({self.reconnect_max_s}) must be at least "
                f"reconnect_min_s ({self.reconnect_min_s})"
            )
        return self

    @property
    def tls(self) -> bool:
        """Whether any node is reached over TLS (``mqtts://``)."""
        return any(a.tls for a in self.endpoint(None, None).addresses)

    @property
    def host(self) -> str:
        """The first node's host name or address."""
        return parse_url(self.url).address.host

    @property
    def port(self) -> int:
        """The first node's port (1883 for mqtt://, 8883 for mqtts:// unless the URL says otherwise)."""
        return parse_url(self.url).address.port

    def endpoint(self, username: str | None, password: str | None) -> Endpoint:
        """The nodes (``url``, then ``failover_urls``) with these credentials and the TLS files."""
        return Endpoint.parse(
            [self.url, *self.failover_urls],
            username=username,
            password=password,
            ca_file=self.ca_file,
            client_cert=self.client_cert,
            client_key=self.client_key,
            credentials_in_url=False,
        )

    def session_options(self) -> SessionOptions:
        """Protocol, keepalive, reconnect back-off and queue size as the session takes them."""
        return SessionOptions(
            protocol=self.protocol,
            keepalive_s=self.keepalive_s,
            reconnect_min_s=self.reconnect_min_s,
            reconnect_max_s=self.reconnect_max_s,
            max_queued_messages=self.max_queued_messages,
            subscribe_qos=self.subscribe_qos,
        )

    def read_password(self) -> str | None:
        """The password, from the file when configured so; ``DocumentError`` when unreadable."""
        return _read_secret(self.password, self.password_file)


class BackoffSettings(_Settings):
    """Capped exponential back-off: ``min(base_s * 2**n, max_s)`` seconds."""

    base_s: float = Field(default=10.0, gt=0, le=86400)
    max_s: float = Field(default=300.0, gt=0, le=86400)

    @model_validator(mode="after")
    def _ordered(self) -> BackoffSettings:
        if self.max_s < self.base_s:
            raise ValueError(f"max_s ({self.max_s}) must be at least base_s ({self.base_s})")
        return self


class RestartSettings(BackoffSettings):
    """Module restart back-off, and how long a module must run healthy to reset its count."""

    reset_after_s: float = Field(default=600.0, gt=0, le=7 * 86400)


class RegistrySecret(_Settings):
    """Credentials for an image registry, named by ``RegistryCredentialRef.secret``."""

    username: str = Field(min_length=1)
    password: SecretStr | None = None
    password_file: Path | None = None

    @model_validator(mode="after")
    def _one_password(self) -> RegistrySecret:
        if (self.password is None) == (self.password_file is None):
            raise ValueError("give exactly one of password or password_file")
        return self

    def read_password(self) -> str:
        """The password, from the file when configured so; ``DocumentError`` when unreadable."""
        secret = _read_secret(self.password, self.password_file)
        assert secret is not None
        return secret


class PullSettings(_Settings):
    """How the agent downloads images: method, bandwidth budget, update window, link tolerance."""

    method: Literal["resumable", "engine"] = Field(
        default="resumable",
        description="resumable: the agent's own registry client (Range resume, digests checked, blobs "
        "kept in <state_dir>/blobs); engine: Docker Engine's pull (restarts interrupted layers)",
    )
    max_bytes_per_s: int | None = Field(
        default=None, ge=1024, description="bandwidth budget for all pulls together (resumable only)"
    )
    window: str | None = Field(default=None, description="HH:MM-HH:MM (UTC): pulls start only inside it")
    plain_http_registries: list[str] = Field(
        default_factory=list,
        description="registries (host:port) spoken to over plain HTTP; loopback ones always are",
    )
    stall_timeout_s: float = Field(default=30.0, gt=0, le=3600, description="no byte this long: reconnect")
    progress_every_s: float = Field(default=10.0, gt=0, le=3600, description="report progress this often")
    gc_grace_s: float = Field(
        default=86400.0,
        ge=0,
        le=365 * 86400,
        description="images the agent pulled that are neither desired nor last known good are removed "
        "this long after they stopped being needed; partial downloads untouched this long go too",
    )
    min_free_mb: int = Field(
        default=200,
        ge=0,
        description="a pull that would leave less free disk than this fails before it starts",
    )

    @field_validator("window")
    @classmethod
    def _window(cls, v: str | None) -> str | None:
        if v is not None:
            UpdateWindow.parse(v)
        return v

    def update_window(self) -> UpdateWindow | None:
        """The window, parsed (None when pulls may start any time)."""
        return UpdateWindow.parse(self.window) if self.window else None

    def tracker(self) -> PullTracker:
        """The pull tracker with this window and progress interval."""
        return PullTracker(window=self.update_window(), progress_every_s=self.progress_every_s)

    def image_book(self, state_dir: Path) -> ImageBook:
        """The book of the images the agent pulled (``<state_dir>/images.json``)."""
        return ImageBook(Path(state_dir) / BOOK_FILE)

    def puller(self, state_dir: Path) -> RegistryPuller | None:
        """The resumable puller over ``<state_dir>/blobs`` (None for ``method: engine``)."""
        if self.method != "resumable":
            return None
        return RegistryPuller(
            BlobStore(Path(state_dir) / BLOBS_DIR),
            min_free_bytes=self.min_free_mb * 1024 * 1024,
            bucket=TokenBucket(self.max_bytes_per_s) if self.max_bytes_per_s else None,
            plain_http=self.plain_http_registries,
            stall_timeout_s=self.stall_timeout_s,
        )


class AgentConfig(_Settings):
    """Everything one agent needs to know about itself, its broker and its device."""

    device_id: Name
    broker: BrokerConfig
    cloud_public_key: Path = Field(description="PEM Ed25519 key that verifies desired states")
    state_dir: Path
    runtime: Literal["docker", "process"] = "docker"
    images_dir: Path = Field(
        default=None,
        validate_default=True,
        description="process runtime: unpacked modules (<images_dir>/<repository>/<tag>/); "
        "default <state_dir>/images",
    )
    restart: RestartSettings = Field(default_factory=RestartSettings)
    pull_retry: BackoffSettings = Field(default_factory=BackoffSettings)
    pull: PullSettings = Field(default_factory=PullSettings)
    health_start_period_s: float = Field(
        default=DEFAULT_START_PERIOD_S,
        ge=0,
        le=86400,
        description="failed liveness probes after a start count once the module was live, or after this long",
    )
    heartbeat_s: float = Field(
        default=90.0,
        gt=0,
        le=86400,
        description="an idle agent sends a small heartbeat this often (stale in the cloud after 3 missed)",
    )
    report_refresh_s: float = Field(
        default=3600.0,
        gt=0,
        le=7 * 86400,
        description="the full report (with fresh system metrics) goes out at least this often; otherwise "
        "only when something changed",
    )
    metrics_port: int | None = Field(
        default=None, ge=0, le=65535, description="Prometheus metrics on 127.0.0.1; 0 or absent = off"
    )
    registry_secrets: dict[str, RegistrySecret] = Field(default_factory=dict)
    sealing_key: SecretStr | None = Field(
        default=None,
        description="X25519 private key (base64) that opens the registry credentials the cloud seals to "
        "this device; written by edgectl device add",
    )

    @field_validator("sealing_key")
    @classmethod
    def _sealing_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            try:
                load_private(v.get_secret_value())
            except SealingError as e:
                raise ValueError(str(e)) from None
        return v

    def sealing_private_key(self) -> X25519PrivateKey | None:
        """The sealing key, loaded (None when the config has none)."""
        return load_private(self.sealing_key.get_secret_value()) if self.sealing_key else None

    @field_validator("images_dir", mode="before")
    @classmethod
    def _default_images_dir(cls, value: Any, info: ValidationInfo) -> Any:
        """``<state_dir>/images`` when not given (a bad ``state_dir`` is reported on its own)."""
        if value is not None:
            return value
        state_dir = info.data.get("state_dir")
        return state_dir / "images" if isinstance(state_dir, Path) else Path("images")

    @property
    def mqtt_client_id(self) -> str:
        """The MQTT client id: ``broker.client_id`` or the device id."""
        return self.broker.client_id or self.device_id

    @property
    def mqtt_username(self) -> str | None:
        """The MQTT username: ``broker.username``, else the device id when a password is configured."""
        if self.broker.username is not None:
            return self.broker.username
        if self.broker.password is not None or self.broker.password_file is not None:
            return self.device_id
        return None

    def planner_config(self) -> PlannerConfig:
        """The restart and pull back-off numbers as the planner takes them."""
        return PlannerConfig(
            restart=RestartPolicyConfig(
                base_s=self.restart.base_s, max_s=self.restart.max_s, reset_after_s=self.restart.reset_after_s
            ),
            pull_retry=BackoffConfig(base_s=self.pull_retry.base_s, max_s=self.pull_retry.max_s),
        )


def _resolve_paths(model: S, base: Path) -> S:
    """A copy of ``model`` with every relative ``Path`` field (nested too) made relative to ``base``."""
    update: dict[str, object] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, Path) and not value.is_absolute():
            update[name] = base / value
        elif isinstance(value, BaseModel):
            update[name] = _resolve_paths(value, base)
        elif isinstance(value, dict) and any(isinstance(v, BaseModel) for v in value.values()):
            update[name] = {k: _resolve_paths(v, base) for k, v in value.items()}
    return model.model_copy(update=update)


def _input_files(model: BaseModel, prefix: str = "") -> list[tuple[str, Path]]:
    """``(field.path, path)`` of every file the configuration points at (folders excluded)."""
    out: list[tuple[str, Path]] = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        where = f"{prefix}{name}"
        if isinstance(value, Path) and name not in FOLDER_FIELDS:
            out.append((where, value))
        elif isinstance(value, BaseModel):
            out += _input_files(value, f"{where}.")
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, BaseModel):
                    out += _input_files(item, f"{where}.{key}.")
    return out


def load_agent_config(path: str | Path) -> AgentConfig:
    """Read and validate the agent's YAML config; relative paths are taken from the file's folder.

    Raises ``DocumentError`` with one ``<file>: <field>: <message>`` line per problem, including
    files the configuration names that do not exist.
    """
    config = _resolve_paths(load_model_file(AgentConfig, path), Path(path).parent)
    problems = [
        f"{path}: {where}: no such file: {file}" for where, file in _input_files(config) if not file.is_file()
    ]
    for name in sorted(FOLDER_FIELDS):
        folder = getattr(config, name)
        if folder.exists() and not folder.is_dir():
            problems.append(f"{path}: {name}: {folder} exists and is not a folder")
    if problems:
        raise DocumentError(problems)
    return config
