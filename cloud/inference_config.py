"""The inference config: how a registered model is served inside an edge module.

Like Azure ML's InferenceConfig: an entry script with ``init()``/``run()`` (optional when every
model is ONNX: those are served without code), extra source files, pip requirements, environment
variables, input/output samples for the API schema, and where the image goes::

    entry_script: score.py
    source_files: [features.py, labels/]
    requirements: ["scikit-learn==1.5.2"]
    env: {LOG_LEVEL: info}
    batching: {max_batch_size: 32, max_batch_delay_ms: 0}   # no-code ONNX models with a batch dimension
    input_sample_file: samples/input.json      # JSON or YAML; or input_sample: {data: [[5.1, 3.5, 1.4, 0.2]]}
    output_sample: [0]
    base_image: 127.0.0.1:5000/edge/base-cpu:1
    registry:
      address: registry.example.com:5000
      username: builder
      password_env: EDGE_REGISTRY_PASSWORD       # or password_file: ~/.secrets/registry

Paths are relative to the config file's folder. Registry passwords are never written in the
config: only the name of an environment variable or a file holding them, read when needed into a
``SecretStr`` that does not print.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from packaging.requirements import InvalidRequirement, Requirement
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    field_validator,
    model_validator,
)

from modules.contract import Batching, ImageRef, env_with_batching
from modules.documents import DocumentError, load_document, load_model_file, read_text

_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_REGISTRY_RE = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:]+\])(?::[0-9]{1,5})?$"
)
RESERVED_ENV = frozenset({"MODEL_DIR", "AZUREML_MODEL_DIR"})


class InferenceConfigError(DocumentError):
    """A config that cannot be used; the message names the file and the field, one line each."""


def _relative(value: str) -> str:
    p = PurePosixPath(value)
    if not value or p.is_absolute() or ".." in p.parts:
        raise ValueError(f"{value!r} must be a path relative to the config file's folder, without '..'")
    return value


def _env_name(value: str) -> str:
    if not _ENV_RE.match(value):
        raise ValueError(f"{value!r} is not a valid environment variable name")
    return value


class RegistryAuth(BaseModel):
    """A private registry and where its credentials come from (never the password itself)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    address: str = Field(description="host[:port] of the registry")
    username: str | None = None
    username_env: str | None = None
    password_env: str | None = Field(default=None, description="environment variable holding the password")
    password_file: str | None = Field(default=None, description="file holding the password (first line)")

    @model_validator(mode="before")
    @classmethod
    def _no_inline_password(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and "password" in data:
            raise ValueError(
                "do not write the registry password in the config: give password_env "
                "(an environment variable name) or password_file (a file holding it)"
            )
        return data

    @field_validator("address")
    @classmethod
    def _address(cls, v: str) -> str:
        if not _REGISTRY_RE.match(v):
            raise ValueError(f"{v!r} is not a registry address like 'registry.example.com:5000'")
        return v

    @field_validator("username_env", "password_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        return None if v is None else _env_name(v)

    @model_validator(mode="after")
    def _one_source_each(self) -> RegistryAuth:
        if (self.password_env is None) == (self.password_file is None):
            raise ValueError("give exactly one of password_env or password_file")
        if (self.username is None) == (self.username_env is None):
            raise ValueError("give exactly one of username or username_env")
        return self


class RegistryCredentials(BaseModel):
    """Resolved credentials for one registry; the password never appears in repr or str."""

    model_config = ConfigDict(frozen=True)

    address: str
    username: str
    password: SecretStr

    def redacted(self) -> str:
        """A printable description without the password."""
        return f"{self.username}:****@{self.address}"

    def __repr__(self) -> str:
        return f"RegistryCredentials({self.redacted()})"

    __str__ = redacted


class InferenceConfig(BaseModel):
    """What goes into a module image besides the models; see the module docstring for an example."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    entry_script: str | None = Field(default=None, description="Python file with init() and run()")
    source_files: list[str] = Field(default_factory=list, description="files or folders copied next to it")
    requirements: list[str] = Field(default_factory=list, description="pip requirement specifiers")
    env: dict[str, str] = Field(default_factory=dict)
    batching: Batching | None = Field(
        default=None, description="adaptive batching of no-code ONNX models (default: on, 32 rows, no delay)"
    )
    input_sample: Any = None
    input_sample_file: str | None = None
    output_sample: Any = None
    output_sample_file: str | None = None
    base_image: ImageRef | None = Field(default=None, description="replaces the profile's base image")
    registry: RegistryAuth | None = None

    _base_dir: Path | None = PrivateAttr(default=None)

    @field_validator("entry_script")
    @classmethod
    def _script(cls, v: str | None) -> str | None:
        if v is None:
            return None
        if not v.endswith(".py"):
            raise ValueError(f"{v!r} must be a Python file (.py)")
        return _relative(v)

    @field_validator("source_files")
    @classmethod
    def _sources(cls, v: list[str]) -> list[str]:
        for item in v:
            _relative(item)
        dup = sorted({s for s in v if v.count(s) > 1})
        if dup:
            raise ValueError(f"listed twice: {', '.join(dup)}")
        return v

    @field_validator("input_sample_file", "output_sample_file")
    @classmethod
    def _sample_file(cls, v: str | None) -> str | None:
        return None if v is None else _relative(v)

    @field_validator("requirements")
    @classmethod
    def _requirements(cls, v: list[str]) -> list[str]:
        for i, req in enumerate(v):
            if req.strip().startswith("-"):
                raise ValueError(
                    f"item {i}: pip options like {req!r} are not allowed, only requirement specifiers"
                )
            try:
                Requirement(req)
            except InvalidRequirement as e:
                raise ValueError(f"item {i}: {req!r} is not a valid pip requirement ({e})") from None
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key in v:
            _env_name(key)
            if key in RESERVED_ENV:
                raise ValueError(f"{key} is set by the module runtime and cannot be overridden")
        return v

    @model_validator(mode="after")
    def _batching_once(self) -> InferenceConfig:
        env_with_batching(self.env, self.batching)
        return self

    def image_env(self) -> dict[str, str]:
        """``env`` plus the batching variables: what the image sets for the scoring server."""
        return env_with_batching(self.env, self.batching)

    @model_validator(mode="after")
    def _samples_once(self) -> InferenceConfig:
        for kind in ("input", "output"):
            if (
                getattr(self, f"{kind}_sample") is not None
                and getattr(self, f"{kind}_sample_file") is not None
            ):
                raise ValueError(f"give {kind}_sample or {kind}_sample_file, not both")
        return self

    @property
    def base_dir(self) -> Path:
        """The folder relative paths are resolved against: the config file's, else the current one."""
        return self._base_dir if self._base_dir is not None else Path.cwd()

    def path(self, relative: str) -> Path:
        """An absolute path for a path written in the config."""
        return self.base_dir / relative

    def check_entry_script(self, models: Iterable[tuple[str, str]]) -> None:
        """Raise InferenceConfigError without an entry script when a ``(name, framework)`` is not ONNX."""
        if self.entry_script is not None:
            return
        not_onnx = [f"{name} ({framework})" for name, framework in models if framework != "onnx"]
        if not_onnx:
            raise InferenceConfigError(
                f"entry_script: required because {', '.join(not_onnx)} is not ONNX; "
                "only ONNX models are served without code"
            )

    def samples(self) -> tuple[Any, Any]:
        """The input and output samples, read from their JSON files when given as files."""
        return self._sample("input"), self._sample("output")

    def _sample(self, kind: str) -> Any:
        file = getattr(self, f"{kind}_sample_file")
        if file is None:
            return getattr(self, f"{kind}_sample")
        path = self.path(file)
        try:
            return load_document(read_text(path), str(path))
        except DocumentError as e:
            raise InferenceConfigError([f"{kind}_sample_file: {p}" for p in e.problems]) from None

    def credentials(self, env: Mapping[str, str] | None = None) -> RegistryCredentials | None:
        """The registry credentials from the environment or the password file; None without a registry."""
        auth = self.registry
        if auth is None:
            return None
        env = os.environ if env is None else env
        username = auth.username
        if auth.username_env is not None:
            username = env.get(auth.username_env)
            if not username:
                raise InferenceConfigError(
                    f"registry.username_env: environment variable {auth.username_env} is not set"
                )
        if auth.password_env is not None:
            password = env.get(auth.password_env)
            if not password:
                raise InferenceConfigError(
                    f"registry.password_env: environment variable {auth.password_env} is not set"
                )
        else:
            assert auth.password_file is not None
            pw_path = self.base_dir / Path(auth.password_file).expanduser()
            try:
                lines = pw_path.read_text(encoding="utf-8").splitlines()
            except OSError as e:
                raise InferenceConfigError(
                    f"registry.password_file: cannot read {pw_path}: {e.strerror or e}"
                ) from None
            password = lines[0].strip() if lines else ""
            if not password:
                raise InferenceConfigError(f"registry.password_file: {pw_path} is empty")
        assert username is not None
        return RegistryCredentials(address=auth.address, username=username, password=SecretStr(password))

    def missing_files(self) -> list[str]:
        """``field: path`` for each file the config names that does not exist."""
        wanted: list[tuple[str, str | None]] = [
            ("entry_script", self.entry_script),
            ("input_sample_file", self.input_sample_file),
            ("output_sample_file", self.output_sample_file),
        ]
        wanted += [(f"source_files.{i}", s) for i, s in enumerate(self.source_files)]
        return [
            f"{field}: {self.path(rel)} does not exist"
            for field, rel in wanted
            if rel and not self.path(rel).exists()
        ]


def load_inference_config(path: Path) -> InferenceConfig:
    """Load and check an inference config file; InferenceConfigError names the file and the fields."""
    try:
        config = load_model_file(InferenceConfig, path)
    except DocumentError as e:
        raise InferenceConfigError(list(e.problems)) from None
    config._base_dir = path.absolute().parent
    missing = config.missing_files()
    if missing:
        raise InferenceConfigError([f"{path}: {m}" for m in missing])
    return config
