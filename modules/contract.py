"""The edge-module contract shared by the cloud and the agent.

Every concept that crosses a process boundary (a manifest an operator writes, the desired state
the cloud publishes, the state an agent reports, a device profile) is one frozen pydantic model
defined here, once. Nothing in this file does I/O; everything may import it.

Validation errors name the field (pydantic's ``loc``), so ``format_validation_error`` can turn them
into one line per problem, e.g. ``modules.web.ports.0.container: must be between 1 and 65535``.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

# --------------------------------------------------------------------------------------------
# Scalars
# --------------------------------------------------------------------------------------------

INSTANCE_ENV = "EDGE_INSTANCE_ID"
"""The variable through which the agent names each module process (or container) it starts."""
INSTANCE_HEADER = "X-Edge-Instance"
"""The response header in which the scoring server echoes ``INSTANCE_ENV``: the agent's health
probes accept an answer only from the instance they started, not whatever holds the port."""

RestartPolicy = Literal["always", "on-failure", "on-unhealthy", "never"]
DesiredStatus = Literal["running", "stopped"]
RuntimeStatus = Literal["pulling", "created", "running", "unhealthy", "backoff", "stopped", "failed"]
DeploymentStatus = Literal["applying", "healthy", "failed", "rolled_back", "rejected"]
Backend = Literal["onnxruntime", "openvino"]
AcceleratorKind = Literal["nvidia-gpu", "movidius-myriad", "hddl", "xilinx-fpga", "intel-npu"]
CommandName = Literal["logs", "restart", "ping"]
RejectionCode = Literal["too_large", "not_json", "schema", "device", "signature", "generation", "expired"]

_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9_.-]{0,62})$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# Docker/OCI image reference grammar (distribution/reference), without the normalisation.
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"sha256:[a-f0-9]{64}"
_IMAGE_RE = re.compile(
    rf"^(?P<name>(?:(?P<domain>{_DOMAIN})/)?{_COMPONENT}(?:/{_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$"
)


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid name: use 1-63 lowercase letters, digits, '-', '_' or '.', "
            "starting with a letter or digit"
        )
    return value


def _check_image(value: str) -> str:
    if len(value) > 512 or not _IMAGE_RE.match(value):
        raise ValueError(
            f"{value!r} is not a valid image reference "
            "(expected [registry[:port]/]name[:tag][@sha256:<64 hex>], lowercase repository names)"
        )
    return value


Name = Annotated[str, AfterValidator(_check_name)]
"""A device id, module name, deployment name or profile name."""
ImageRef = Annotated[str, AfterValidator(_check_image)]
Port = Annotated[int, Field(ge=1, le=65535)]


class ImageParts(BaseModel):
    """An image reference split into repository, tag and digest."""

    model_config = ConfigDict(frozen=True)
    repository: str
    tag: str | None
    digest: str | None

    @property
    def pinned(self) -> bool:
        """True when the reference names an immutable digest."""
        return self.digest is not None


def split_image_ref(ref: str) -> ImageParts:
    """Split ``registry/name:tag@sha256:...`` into its parts; raises ValueError on bad input."""
    m = _IMAGE_RE.match(_check_image(ref))
    assert m is not None
    return ImageParts(repository=m.group("name"), tag=m.group("tag"), digest=m.group("digest"))


DEFAULT_REGISTRY = "docker.io"


def registry_of(image: str) -> str:
    """The registry host of an image reference, Docker's way (``docker.io`` when none is named)."""
    first, sep, _ = split_image_ref(image).repository.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return DEFAULT_REGISTRY


def utcnow() -> datetime:
    """The current time, timezone-aware in UTC (every timestamp in the contract is aware)."""
    return datetime.now(timezone.utc)


class Frozen(BaseModel):
    """Base of every contract model: immutable, unknown fields rejected."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


def validation_problems(err: ValidationError, source: str | None = None) -> list[str]:
    """One ``source: a.b.0: message`` text per problem of a pydantic error, in ``err.errors()`` order."""
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(document)"
        msg = e["msg"].removeprefix("Value error, ")
        problems.append(f"{source + ': ' if source else ''}{loc}: {msg}")
    return problems


def format_validation_error(err: ValidationError, source: str | None = None) -> str:
    """Render a pydantic error as one line per problem: ``source: a.b.0: message``."""
    return "\n".join(validation_problems(err, source))


# --------------------------------------------------------------------------------------------
# Modules and deployments
# --------------------------------------------------------------------------------------------


class PortMapping(Frozen):
    """A container port published on the device; bound to loopback unless said otherwise."""

    container: Port
    host: Port | None = None
    host_ip: str = "127.0.0.1"
    protocol: Literal["tcp", "udp"] = "tcp"

    @field_validator("host_ip")
    @classmethod
    def _ip(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"{v!r} is not an IP address") from None
        return v


class Resources(Frozen):
    """CPU and memory limits for a module's container or process."""

    cpus: float | None = Field(default=None, gt=0, le=1024)
    memory_mb: int | None = Field(default=None, ge=16)


class HealthCheck(Frozen):
    """How the agent probes a module: liveness on ``path``, readiness on ``ready_path``.

    Until a module has been ready once since its start it is probed every ``start_interval_s``
    (like Docker's ``--start-interval``), afterwards every ``interval_s``.
    """

    path: str = "/"
    ready_path: str = "/v2/health/ready"
    port: Port = 5001
    interval_s: float = Field(default=5.0, gt=0, le=3600)
    start_interval_s: float = Field(default=1.0, gt=0, le=3600)
    timeout_s: float = Field(default=2.0, gt=0, le=600)
    failure_threshold: int = Field(default=3, ge=1, le=100)

    @field_validator("path", "ready_path")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if not v.startswith("/"):
            raise ValueError(f"must start with '/', got {v!r}")
        return v


LATER_MODULE_FIELDS = ("batching", "fallbacks")
"""Optional module settings added after the first release: unset, they are not part of signatures."""

BATCH_SIZE_ENV = "SCORING_MAX_BATCH_SIZE"
BATCH_DELAY_ENV = "SCORING_MAX_BATCH_DELAY_MS"


class Batching(Frozen):
    """Adaptive batching of a no-code ONNX module (models with a dynamic batch dimension only).

    Requests that wait together run as one batch of at most ``max_batch_size`` rows (1 turns
    batching off); a batch starts when full or when its oldest request has waited
    ``max_batch_delay_ms`` (0: as soon as the model is free, so a lone request never waits).
    """

    max_batch_size: int = Field(default=32, ge=1, le=1024)
    max_batch_delay_ms: float = Field(default=0.0, ge=0, le=1000)

    def env(self) -> dict[str, str]:
        """The scoring server's environment variables for these settings."""
        return {BATCH_SIZE_ENV: str(self.max_batch_size), BATCH_DELAY_ENV: f"{self.max_batch_delay_ms:g}"}


def env_with_batching(env: dict[str, str], batching: Batching | None) -> dict[str, str]:
    """``env`` plus ``batching``'s variables; ValueError when ``env`` sets them as well."""
    if batching is None:
        return env
    both = sorted({BATCH_SIZE_ENV, BATCH_DELAY_ENV} & set(env))
    if both:
        raise ValueError(f"set 'batching' or env {', '.join(both)}, not both")
    return {**env, **batching.env()}


def _env_names(v: dict[str, str]) -> dict[str, str]:
    for key in v:
        if not _ENV_RE.match(key):
            raise ValueError(f"{key!r} is not a valid environment variable name")
    return v


def _unique_ports(v: list[PortMapping]) -> list[PortMapping]:
    seen: set[tuple[int, str]] = set()
    for p in v:
        if p.host is None:
            continue
        key = (p.host, p.protocol)
        if key in seen:
            raise ValueError(f"host port {p.host}/{p.protocol} is published twice")
        seen.add(key)
    return v


class ModuleSettings(Frozen):
    """What a module needs to run, apart from which image: shared by manifest and desired state."""

    env: dict[str, str] = Field(default_factory=dict)
    batching: Batching | None = Field(
        default=None, description="adaptive batching (no-code ONNX modules); the image's setting when unset"
    )
    ports: list[PortMapping] = Field(default_factory=list)
    restart_policy: RestartPolicy = "always"
    desired_status: DesiredStatus = "running"
    resources: Resources = Field(default_factory=Resources)
    startup_order: int = Field(default=0, ge=0, le=1000)
    health: HealthCheck = Field(default_factory=HealthCheck)

    _env = field_validator("env")(_env_names)

    @model_validator(mode="after")
    def _batching_once(self) -> ModuleSettings:
        env_with_batching(self.env, self.batching)
        return self

    def container_env(self) -> dict[str, str]:
        """The environment the module runs with: ``env`` plus the batching variables."""
        return env_with_batching(self.env, self.batching)

    _ports = field_validator("ports")(_unique_ports)


def host_ports_unique(modules: dict[str, ModuleSettings]) -> dict[str, ModuleSettings]:
    """Reject two modules publishing the same host port (they would fight over it on the device)."""
    owner: dict[tuple[int, str], str] = {}
    for name, m in modules.items():
        for p in m.ports:
            if p.host is None:
                continue
            other = owner.setdefault((p.host, p.protocol), name)
            if other != name:
                raise ValueError(
                    f"modules {other!r} and {name!r} both publish host port {p.host}/{p.protocol}"
                )
    return modules


def _modules_from_list(value: Any) -> Any:
    """Accept ``modules`` as a list of ``{name: ..., ...}`` too, rejecting duplicate names."""
    if isinstance(value, list):
        out: dict[str, Any] = {}
        for i, item in enumerate(value):
            if not isinstance(item, dict) or "name" not in item:
                raise ValueError(f"item {i} needs a 'name'")
            item = dict(item)
            name = item.pop("name")
            if name in out:
                raise ValueError(f"duplicate module name {name!r}")
            out[name] = item
        return out
    return value


class ModuleSpec(ModuleSettings):
    """A module in a deployment manifest: one image per device profile."""

    images: dict[Name, ImageRef] = Field(min_length=1, description="device profile → image reference")


class ModuleOverride(Frozen):
    """What a layered deployment changes in a module a deployment below it gives the device.

    ``env`` is merged key by key (the layer's value wins); every other field given replaces the
    module's; fields left out keep the module's value.
    """

    env: dict[str, str] = Field(default_factory=dict, description="variables added or replaced")
    batching: Batching | None = None
    ports: list[PortMapping] | None = None
    restart_policy: RestartPolicy | None = None
    desired_status: DesiredStatus | None = None
    resources: Resources | None = None
    startup_order: int | None = Field(default=None, ge=0, le=1000)
    health: HealthCheck | None = None

    _env = field_validator("env")(_env_names)
    _ports = field_validator("ports")(lambda v: None if v is None else _unique_ports(v))

    def changes(self) -> list[str]:
        """The names of what this override changes (``env.NAME`` per variable)."""
        fields = [f"env.{k}" for k in sorted(self.env)]
        return fields + [n for n in type(self).model_fields if n != "env" and getattr(self, n) is not None]

    def apply(self, settings: dict[str, Any]) -> dict[str, Any]:
        """``settings`` (a module's fields as data) with this override applied."""
        out = {**settings, "env": {**settings.get("env", {}), **self.env}}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if name != "env" and value is not None:
                out[name] = value
        return out


class Target(Frozen):
    """Which devices a deployment selects: all conditions given must hold."""

    device_ids: list[Name] = Field(default_factory=list)
    tags: dict[str, str] = Field(default_factory=dict)
    profile: Name | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> Target:
        if not self.device_ids and not self.tags and self.profile is None:
            raise ValueError("target selects nothing: give device_ids, tags or a profile")
        return self

    def matches(self, device_id: str, tags: dict[str, str], profile: str) -> bool:
        """True when a device with these properties is selected."""
        if self.device_ids and device_id not in self.device_ids:
            return False
        if self.profile is not None and profile != self.profile:
            return False
        return all(tags.get(k) == v for k, v in self.tags.items())


_WAVE_PCT_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)%$")


def _check_wave(value: Any) -> int | str:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    if isinstance(value, str):
        if value.isdigit() and int(value) >= 1:
            return int(value)
        m = _WAVE_PCT_RE.match(value)
        if m and 0 < float(m.group(1)) <= 100:
            return value
    raise ValueError(f"{value!r} must be a device count (≥ 1) or a percentage like '10%' (0 < p ≤ 100)")


WaveSize = Annotated[int | str, PlainValidator(_check_wave)]


class Rollout(Frozen):
    """Waves of devices (counts or percentages of the target); halt beyond the failure ratio."""

    waves: list[WaveSize] = Field(default_factory=lambda: list[int | str](["100%"]), min_length=1)
    max_failure_ratio: float = Field(default=0.1, ge=0, le=1)
    revert_on_halt: bool = False


class DeploymentManifest(Frozen):
    """What an operator applies: which modules run on which devices."""

    name: Name
    target: Target
    priority: int = Field(default=0, ge=-1000, le=1000)
    layered: bool = Field(
        default=False,
        description="a layer: adds and overrides modules on top of the deployments below it "
        "instead of replacing them",
    )
    modules: dict[Name, ModuleSpec] = Field(default_factory=dict, validate_default=True)
    overrides: dict[Name, ModuleOverride] = Field(
        default_factory=dict,
        validate_default=True,
        description="layered only: settings changed in modules from below",
    )
    registry_credentials: list[Name] = Field(
        default_factory=list,
        description="cloud credentials (edgectl credential set NAME) the devices pull this deployment's "
        "images with; each reaches a device sealed to its key",
    )
    rollout: Rollout = Field(default_factory=Rollout)
    rollback: Literal["auto", "none"] = "auto"
    health_deadline_s: float = Field(default=120.0, gt=0, le=86400)

    _split_modules = field_validator("modules", mode="before")(_modules_from_list)
    _ports = field_validator("modules")(host_ports_unique)

    @field_validator("registry_credentials")
    @classmethod
    def _credentials_once(cls, v: list[str]) -> list[str]:
        twice = sorted({n for n in v if v.count(n) > 1})
        if twice:
            raise ValueError(f"credential(s) {', '.join(twice)} listed twice")
        return v

    @field_validator("modules")
    @classmethod
    def _some_modules(cls, v: dict[str, ModuleSpec], info: ValidationInfo) -> dict[str, ModuleSpec]:
        if not v and not info.data.get("layered"):
            raise ValueError("should have at least 1 item (only a layered deployment may have none)")
        return v

    @field_validator("overrides")
    @classmethod
    def _overrides_layered(
        cls, v: dict[str, ModuleOverride], info: ValidationInfo
    ) -> dict[str, ModuleOverride]:
        if v and not info.data.get("layered"):
            raise ValueError("needs 'layered: true' (only a layer changes modules from below it)")
        both = sorted(set(v) & set(info.data.get("modules") or {}))
        if both:
            raise ValueError(f"module(s) {', '.join(both)} are in 'modules' as well")
        if info.data.get("layered") and not v and not info.data.get("modules", True):
            raise ValueError("a layered deployment needs 'modules' or 'overrides'")
        return v


# --------------------------------------------------------------------------------------------
# Desired state (cloud → device)
# --------------------------------------------------------------------------------------------


class RegistryCredentialRef(Frozen):
    """Credentials for a registry: sealed to the device by the cloud, or named in the agent's config.

    A cloud credential (``name``) carries the username and the password sealed to the device's
    X25519 key (``modules/sealing.py``), bound to ``sealing_context``; only that device opens it.
    A ``secret`` names credentials the agent's own config holds (``registry_secrets``).
    """

    registry: str = Field(min_length=1)
    secret: str | None = Field(
        default=None, min_length=1, description="name of the credential in the agent's secret store"
    )
    name: Name | None = Field(default=None, description="the cloud's credential name (edgectl credential)")
    revision: int | None = Field(default=None, ge=1, description="the credential's revision (rotation)")
    username: str | None = Field(default=None, min_length=1)
    sealed: str | None = Field(
        default=None, description="the password sealed to the device's key (base64; modules/sealing.py)"
    )

    @model_validator(mode="after")
    def _one_source(self) -> RegistryCredentialRef:
        if (self.secret is None) == (self.name is None):
            raise ValueError(
                "give exactly one of 'secret' (agent's secret store) or 'name' (cloud credential)"
            )
        if self.name is not None and (self.username is None or self.revision is None):
            raise ValueError(f"cloud credential {self.name!r} needs 'username' and 'revision'")
        return self

    def sealing_context(self, device_id: str) -> bytes:
        """What a sealed password is bound to: the device, the registry, the credential and revision."""
        return "\0".join((device_id, self.registry, self.name or "", str(self.revision or 0))).encode()


CREDENTIAL_FIELDS_OMITTED_WHEN_UNSET = ("secret", "name", "revision", "username", "sealed")
"""Credential fields left out of the signed document while unset (a state with only
``registry``/``secret`` signs as it did before cloud credentials existed)."""


class ProfileImage(Frozen):
    """A module's image for one device profile (a step of the device's fallback chain)."""

    profile: Name
    image: ImageRef


class DesiredModule(ModuleSettings):
    """A module as one device must run it: the image already chosen for the device's profile."""

    image: ImageRef
    profile: Name = "cpu"
    version: str | None = Field(default=None, description="module version, for reporting")
    fallbacks: list[ProfileImage] | None = Field(
        default=None,
        description="the images of the profiles after 'profile' in the device's fallback chain, in order: "
        "the agent runs the first whose accelerator it detects and falls back when a start fails for "
        "an accelerator reason (never for a strict profile)",
    )

    def candidates(self) -> list[ProfileImage]:
        """``(profile, image)`` first, then the fallbacks."""
        return [ProfileImage(profile=self.profile, image=self.image), *(self.fallbacks or [])]


class DesiredState(Frozen):
    """Everything one device must run, signed by the cloud (Ed25519 over ``canonical_bytes``)."""

    device_id: Name
    generation: int = Field(ge=1)
    issued_at: datetime
    expires_at: datetime
    deployment: str | None = None
    modules: dict[Name, DesiredModule] = Field(default_factory=dict)
    registry_credentials: list[RegistryCredentialRef] = Field(default_factory=list)
    rollback: Literal["auto", "none"] = "auto"
    health_deadline_s: float = Field(default=120.0, gt=0, le=86400)
    signature: str | None = Field(default=None, description="base64 Ed25519 signature")

    _split_modules = field_validator("modules", mode="before")(_modules_from_list)
    _ports = field_validator("modules")(host_ports_unique)

    @field_validator("issued_at", "expires_at")
    @classmethod
    def _aware(cls, v: datetime, info: ValidationInfo) -> datetime:
        if v.tzinfo is None:
            raise ValueError("timestamp needs a timezone (use UTC, e.g. 2026-01-01T00:00:00Z)")
        issued = info.data.get("issued_at")
        if info.field_name == "expires_at" and issued is not None and v <= issued:
            raise ValueError(f"must be after issued_at ({issued.isoformat()})")
        return v

    def signed_document(self) -> dict[str, Any]:
        """What is signed, as JSON data: everything but the signature.

        Module fields added after the first release (``LATER_MODULE_FIELDS``) are left out while
        unset, so a state signed by a cloud that predates them verifies on a newer agent and back.
        """
        data = self.model_dump(mode="json", exclude={"signature"})
        for module in data["modules"].values():
            for name in LATER_MODULE_FIELDS:
                if module.get(name) is None:
                    module.pop(name, None)
        for credential in data["registry_credentials"]:
            for name in CREDENTIAL_FIELDS_OMITTED_WHEN_UNSET:
                if credential.get(name) is None:
                    credential.pop(name, None)
        return data

    def canonical_bytes(self) -> bytes:
        """The bytes that are signed: canonical JSON of ``signed_document``."""
        return canonical_json(self.signed_document())


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON (sorted keys, no spaces, UTF-8) for signing and hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    """``sha256:<hex>`` of ``data``: how image manifests, configs and blobs are named."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Reported state (device → cloud)
# --------------------------------------------------------------------------------------------


class ModuleHealth(Frozen):
    """The last probe of a module."""

    live: bool
    ready: bool
    latency_ms: float | None = None
    checked_at: datetime | None = None
    error: str | None = None


class PullProgress(Frozen):
    """How far the download of a module's image has come (only while it is being pulled).

    ``bytes_done`` counts what is on the device already (blobs kept from earlier pulls included),
    ``bytes_total`` the image's compressed size; both are ``None`` before the manifest is read.
    ``waiting_until`` is set while the pull waits for the update window.
    """

    image: str
    bytes_done: int = Field(default=0, ge=0)
    bytes_total: int | None = Field(default=None, ge=0)
    bytes_per_s: float | None = Field(default=None, ge=0)
    eta_s: float | None = Field(default=None, ge=0)
    resumed_bytes: int = Field(
        default=0, ge=0, description="bytes of partial downloads kept across a link drop or agent restart"
    )
    waiting_until: datetime | None = None

    @property
    def percent(self) -> float | None:
        """``bytes_done`` as a percentage of ``bytes_total`` (``None`` while the total is unknown)."""
        if not self.bytes_total:
            return None
        return min(100.0, 100.0 * self.bytes_done / self.bytes_total)

    def describe(self) -> str:
        """One line for people: ``pull 3.0 MB of 12.0 MB (25%), 31.0 kB/s, ETA 5 min`` (or the wait)."""
        if self.waiting_until is not None:
            return (
                f"pull of {self.image} waits for the update window "
                f"(opens {self.waiting_until:%Y-%m-%d %H:%M} UTC)"
            )
        if self.bytes_total is None:
            return f"pull of {self.image}: reading the manifest"
        done, total = self.bytes_done / 1e6, self.bytes_total / 1e6
        parts = [f"pull {done:.1f} MB of {total:.1f} MB ({self.percent or 0:.0f}%)"]
        if self.bytes_per_s:
            parts.append(f"{self.bytes_per_s / 1e3:.1f} kB/s")
        if self.eta_s is not None:
            parts.append(f"ETA {self.eta_s / 60:.0f} min" if self.eta_s >= 90 else f"ETA {self.eta_s:.0f} s")
        if self.resumed_bytes:
            parts.append(f"{self.resumed_bytes / 1e6:.1f} MB kept across link drops")
        return ", ".join(parts)


class ModuleStatus(Frozen):
    """What the agent observes of one module."""

    runtime_status: RuntimeStatus
    exit_code: int | None = None
    restart_count: int = Field(default=0, ge=0)
    last_start: datetime | None = None
    image: str | None = None
    image_digest: str | None = None
    execution_provider: str | None = None
    precision: str | None = Field(
        default=None, description="numeric precision the backend computes in (f32, bf16, f16, int8)"
    )
    health: ModuleHealth | None = None
    message: str | None = None
    profile: Name | None = Field(default=None, description="the device profile whose image runs")
    profile_note: str | None = Field(
        default=None, description="why that profile and not the first choice (a fallback taken on the device)"
    )
    pull: PullProgress | None = Field(
        default=None, description="download progress of the image this module waits for (absent otherwise)"
    )


class SystemMetrics(Frozen):
    """Device load at report time; ``temperature_c`` only where a thermal zone exists."""

    cpu_percent: float = Field(ge=0)
    memory_used_mb: float = Field(ge=0)
    memory_total_mb: float = Field(ge=0)
    disk_free_mb: float = Field(ge=0)
    temperature_c: float | None = None
    disk_min_free_mb: float | None = Field(
        default=None, ge=0, description="the free disk a pull must leave (the agent's pull.min_free_mb)"
    )
    disk_low: bool = Field(
        default=False, description="disk_free_mb is below disk_min_free_mb: the next pull will fail"
    )

    def disk_warning(self) -> str | None:
        """One line for people while the disk is low, else None."""
        if not self.disk_low:
            return None
        return (
            f"disk low: {self.disk_free_mb:.0f} MB free, pulls need {self.disk_min_free_mb or 0:.0f} MB "
            "left free (free space or lower pull.min_free_mb)"
        )


class Accelerator(Frozen):
    """A piece of inference hardware the agent found on the device."""

    kind: AcceleratorKind
    path: str
    detail: str = ""


class Rejection(Frozen):
    """One desired-state payload the agent refused: an event, kept apart from the applied status."""

    code: RejectionCode
    reason: str
    generation: int | None = Field(default=None, description="the received generation, when readable")
    at: datetime


class ClientConflict(Frozen):
    """Another MQTT client took this device's session over: two agents share one device id."""

    detected_at: datetime
    takeovers: int = Field(ge=1, description="sessions taken over since the agent started")
    detail: str


class ReportedState(Frozen):
    """What a device reports on ``edge/{d}/reported`` (retained): on change and at least hourly.

    Between full reports an agent sends a ``Heartbeat`` every ``heartbeat_s`` (older agents repeat
    the full report instead; both keep the device fresh).

    ``deployment_status`` and ``reason`` describe the applied generation; a refused payload is
    ``last_rejection`` (``rejected`` as a status only while nothing newer has been admitted).
    """

    device_id: Name
    generation_applied: int = Field(default=0, ge=0)
    generation_received: int | None = Field(default=None, ge=0)
    deployment_status: DeploymentStatus
    reason: str | None = None
    last_rejection: Rejection | None = None
    client_conflict: ClientConflict | None = None
    modules: dict[Name, ModuleStatus] = Field(default_factory=dict)
    system: SystemMetrics | None = None
    accelerators: list[Accelerator] = Field(default_factory=list)
    agent_version: str
    heartbeat_s: float | None = Field(
        default=None,
        gt=0,
        description="how often the agent re-reports; the cloud calls it stale after 3 missed",
    )
    reported_at: datetime = Field(default_factory=utcnow)


class Heartbeat(Frozen):
    """Payload of ``edge/{d}/heartbeat`` (not retained): "still here, nothing changed".

    An idle agent sends this small message every ``heartbeat_s`` instead of repeating its full
    ``ReportedState``; ``report_at`` is the ``reported_at`` of the full report it stands by (the
    retained one on ``edge/{d}/reported``), so the cloud can tell whether it holds that report.
    """

    device_id: Name
    generation_applied: int = Field(default=0, ge=0)
    report_at: datetime = Field(description="reported_at of the last full report the agent published")
    heartbeat_s: float = Field(gt=0)
    reported_at: datetime = Field(default_factory=utcnow)


class OnlineStatus(Frozen):
    """Payload of ``edge/{d}/online`` (the last will publishes ``online: false``).

    ``session`` orders messages: it grows with every MQTT connection of the device (the birth and
    the last will of one connection carry the same number, and the will comes after the birth),
    so ingest never judges online/offline by wall-clock fields written at different moments.
    ``instance`` identifies the agent process, so two agents sharing a device id can be told apart.
    ``generation`` (birth messages only) announces the generation the agent has applied when the
    session starts: the cloud answers a device that is behind with its current desired state.
    """

    online: bool
    ts: datetime = Field(default_factory=utcnow)
    session: int | None = Field(default=None, ge=0)
    instance: str | None = Field(default=None, max_length=64)
    generation: int | None = Field(default=None, ge=0)


class CommandRequest(Frozen):
    """A command sent to a device on ``edge/{d}/cmd/req/{id}``."""

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    command: CommandName
    module: Name | None = None
    tail: int = Field(default=100, ge=1, le=10000)

    @model_validator(mode="after")
    def _module_needed(self) -> CommandRequest:
        if self.command in ("logs", "restart") and self.module is None:
            raise ValueError(f"command {self.command!r} needs a module")
        return self


class CommandResponse(Frozen):
    """The answer on ``edge/{d}/cmd/res/{id}``."""

    id: str
    ok: bool
    output: str = ""
    error: str | None = None


# --------------------------------------------------------------------------------------------
# Module images
# --------------------------------------------------------------------------------------------


class ModelRef(Frozen):
    """A registered model inside a module image: ``/module/models/<name>/<version>/``."""

    name: Name
    version: int = Field(ge=1)
    files: list[str] = Field(default_factory=list)


class ModuleInfo(Frozen):
    """``/module/module.json``: what an image holds and how its scoring server must start."""

    name: Name
    version: str = "1"
    profile: Name = "cpu"
    models: list[ModelRef] = Field(default_factory=list)
    entry_script: str | None = None
    input_sample: Any = None
    output_sample: Any = None


# --------------------------------------------------------------------------------------------
# Device profiles (device-profiles/*.yaml)
# --------------------------------------------------------------------------------------------


class ExecutionProvider(Frozen):
    """An onnxruntime execution provider and its options, e.g. ``CUDAExecutionProvider``."""

    name: str = Field(pattern=r"^[A-Za-z]+ExecutionProvider$")
    options: dict[str, str | int | float | bool] = Field(default_factory=dict)


class OnnxRuntimeSettings(Frozen):
    """onnxruntime settings of a profile: providers in priority order."""

    package: str = Field(default="onnxruntime", description="pip package that provides onnxruntime")
    providers: list[ExecutionProvider] = Field(min_length=1)

    @field_validator("providers")
    @classmethod
    def _unique(cls, v: list[ExecutionProvider]) -> list[ExecutionProvider]:
        names = [p.name for p in v]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"provider listed twice: {sorted(dup)}")
        return v


class OpenVinoSettings(Frozen):
    """OpenVINO settings of a profile: the device plugin and the runtime version that has it."""

    device: str = Field(pattern=r"^[A-Z][A-Z0-9_.:,()-]*$", description="CPU, GPU, NPU, MYRIAD, HDDL, AUTO:…")
    version: str = Field(description="pip requirement for openvino, e.g. 'openvino>=2024.0'")
    config: dict[str, str | int | float | bool] = Field(default_factory=dict)


class GpuRequest(Frozen):
    """Docker device request for GPUs (``--gpus``)."""

    driver: str = "nvidia"
    count: int = Field(default=-1, ge=-1, description="-1 means all")
    capabilities: list[str] = Field(default_factory=lambda: ["gpu"])


class ContainerAccess(Frozen):
    """What a module's container needs from the host to reach the accelerator."""

    gpus: GpuRequest | None = None
    devices: list[str] = Field(default_factory=list, description="host[:container[:perms]] device nodes")
    device_cgroup_rules: list[str] = Field(default_factory=list)
    volumes: list[str] = Field(default_factory=list, description="host:container[:ro] bind mounts")
    group_add: list[str] = Field(default_factory=list)
    privileged: bool = False
    privileged_reason: str | None = None

    @field_validator("devices")
    @classmethod
    def _device_paths(cls, v: list[str]) -> list[str]:
        for d in v:
            if not d.startswith("/dev/"):
                raise ValueError(f"device {d!r} must be a path under /dev/")
        return v

    @field_validator("volumes")
    @classmethod
    def _volumes(cls, v: list[str]) -> list[str]:
        for vol in v:
            parts = vol.split(":")
            ok = len(parts) in (2, 3) and all(p.startswith("/") for p in parts[:2])
            if not ok or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
                raise ValueError(f"volume {vol!r} must be /host/path:/container/path[:ro|rw]")
        return v

    @field_validator("device_cgroup_rules")
    @classmethod
    def _cgroup_rules(cls, v: list[str]) -> list[str]:
        rule = re.compile(r"^[abc] (\d+|\*):(\d+|\*) [rwm]{1,3}$")
        for r in v:
            if not rule.match(r):
                raise ValueError(f"{r!r} is not a device cgroup rule like 'c 189:* rmw'")
        return v

    @model_validator(mode="after")
    def _justify_privileged(self) -> ContainerAccess:
        if self.privileged and not self.privileged_reason:
            raise ValueError(
                "privileged containers need a privileged_reason saying why nothing narrower works"
            )
        return self


class DetectRule(Frozen):
    """One way the agent recognises the hardware, relative to a configurable root (for tests).

    ``path``: a glob that must match (``/dev/nvidia[0-9]*``); ``usb_vendor``: a USB vendor id found
    in ``/sys/bus/usb/devices/*/idVendor``; ``pci_vendor``: a PCI vendor id (with optional
    ``pci_class`` prefix) in ``/sys/bus/pci/devices/*/``.
    """

    kind: Literal["path", "usb_vendor", "pci_vendor"]
    value: str = Field(min_length=1)
    pci_class: str | None = Field(default=None, pattern=r"^[0-9a-f]{2,6}$")
    accelerator: AcceleratorKind

    @model_validator(mode="after")
    def _ids(self) -> DetectRule:
        if self.kind in ("usb_vendor", "pci_vendor") and not re.match(r"^[0-9a-f]{4}$", self.value):
            raise ValueError(f"{self.kind} {self.value!r} must be 4 lowercase hex digits like '03e7'")
        if self.kind == "path" and not self.value.startswith("/"):
            raise ValueError(f"path {self.value!r} must be absolute")
        if self.pci_class is not None and self.kind != "pci_vendor":
            raise ValueError("pci_class only applies to pci_vendor rules")
        return self


class Detection(Frozen):
    """The hardware is present when every ``all_of`` rule and, if given, any ``any_of`` rule matches.

    ``always`` is for profiles that need no hardware (CPU).
    """

    always: bool = False
    any_of: list[DetectRule] = Field(default_factory=list)
    all_of: list[DetectRule] = Field(default_factory=list)

    @model_validator(mode="after")
    def _something(self) -> Detection:
        if not self.always and not self.any_of and not self.all_of:
            raise ValueError("give detection rules (any_of / all_of) or always: true")
        return self


class BaseImage(Frozen):
    """Where a profile's base image comes from and what goes into it."""

    image: ImageRef
    python: str = Field(default="3.11", pattern=r"^3\.[0-9]+$", description="the image's Python version")
    source: Literal["debootstrap", "vendor"] = Field(
        description="debootstrap: built here from Debian + PyPI; vendor: the vendor's image must be provided"
    )
    python_packages: list[str] = Field(default_factory=list)
    apt_packages: list[str] = Field(default_factory=list)
    vendor_note: str | None = None

    @model_validator(mode="after")
    def _vendor_explained(self) -> BaseImage:
        if self.source == "vendor" and not self.vendor_note:
            raise ValueError("a vendor base image needs a vendor_note saying where it comes from")
        return self


class DeviceProfile(Frozen):
    """A deployment target: base image, inference backend, container access, detection, fallback."""

    name: Name
    description: str
    base: BaseImage
    backend: Backend
    onnxruntime: OnnxRuntimeSettings | None = None
    openvino: OpenVinoSettings | None = None
    strict: bool = Field(
        default=False,
        description="fail start-up when the first (accelerator) provider is unavailable, never fall back",
    )
    container: ContainerAccess = Field(default_factory=ContainerAccess)
    detect: Detection
    fallback: Name | None = None
    support: str = Field(default="", description="honest notes on what current runtimes support")

    @model_validator(mode="after")
    def _backend_settings(self) -> DeviceProfile:
        if self.backend == "onnxruntime" and self.onnxruntime is None:
            raise ValueError("backend 'onnxruntime' needs an 'onnxruntime' section")
        if self.backend == "openvino" and self.openvino is None:
            raise ValueError("backend 'openvino' needs an 'openvino' section")
        if self.fallback == self.name:
            raise ValueError("a profile cannot fall back to itself")
        return self
