"""Scoring server configuration: environment variables, ``/module/module.json``, CLI flags.

Precedence: CLI flag, then environment variable, then module.json, then the default. Every
variable is listed in ``VARIABLES`` (``--help`` prints them).
"""

from __future__ import annotations

import argparse
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import ValidationError

from modules.contract import (
    BATCH_DELAY_ENV,
    BATCH_SIZE_ENV,
    INSTANCE_ENV,
    INSTANCE_HEADER,
    Batching,
    ModuleInfo,
    format_validation_error,
)
from modules.scoring.cpus import allowed_cpus

DEFAULT_MODULE_JSON = "/module/module.json"

EXIT_CONFIG = 2
"""Exit status for a configuration error or a port that cannot be bound."""

WORKERS_ENV = "SCORING_WORKERS"
WORKER_ENV = "EDGE_SCORING_WORKER"
"""Set by the supervisor for its worker processes only: ``index/count/listen_fd/run_dir``."""

VARIABLES: dict[str, str] = {
    "MODEL_DIR": "the model's folder (one model) or the models root holding <name>/<version>/ (several); "
    "AZUREML_MODEL_DIR is read too and both are set for the entry script",
    "ENTRY_SCRIPT": "path of score.py (init()/run()); without it the server runs the ONNX model(s) itself",
    "PORT": "TCP port to listen on (default 5001)",
    "HOST": "address to listen on (default 0.0.0.0 inside a module image, i.e. when module.json "
    "exists, else 127.0.0.1)",
    "PROFILE": "device profile (device-profiles/<name>.yaml) for ONNX models "
    "(default: module.json's, else cpu)",
    "EDGE_PROFILES_DIR": "folder of device profile YAML files "
    "(default: /module/profiles inside a module image, else device-profiles/ of the checkout)",
    "MODULE_JSON": f"module description (default {DEFAULT_MODULE_JSON}; read when present)",
    "MODEL_NAME": "name served for a single model (default: from module.json or the folder name)",
    "SCORING_KEY": "when set, /score and /v2/models/*/infer need 'Authorization: Bearer <key>' "
    "(environment only: never pass keys on a command line)",
    "SCORING_TIMEOUT": "seconds a request may take before it is answered 504 (default 60)",
    "MAX_REQUEST_BYTES": "largest request body accepted, larger ones get 413 (default 16777216)",
    "SCORING_THREADS": "CPUs inference may use (default: those this process may use: affinity and cgroup "
    "quota). An entry script's run() may be called from this many threads at once (1: one at a time); "
    "no-code ONNX models run one batch at a time on this many onnxruntime threads, or, without a "
    "batch dimension, this many requests at once on one thread each",
    BATCH_SIZE_ENV: "no-code ONNX models with a dynamic batch dimension: requests that wait together "
    "run as one batch of at most this many rows (default 32; 1 turns batching off)",
    BATCH_DELAY_ENV: "milliseconds a batch may wait for more requests once its first one arrived "
    "(default 0: it runs as soon as the model is free, so a lone request never waits)",
    WORKERS_ENV: "server processes sharing the port, each with its own event loop, batcher and "
    "SCORING_THREADS/N inference threads: 'auto' (default) is one per CPU for no-code modules on a CPU "
    "profile and 1 otherwise (entry scripts, accelerators); /metrics and readiness cover them all",
    "SCORING_MAX_QUEUE": "requests that may wait for a worker thread; more get 503 (default 256)",
    "EXIT_ON_INIT_FAILURE": "exit with status 3 when loading the model or init() fails (default 1); "
    "0 keeps the server up, not ready, explaining why on /v2/health/ready",
    "LOG_ACCESS": "1 logs every request (default 0)",
    "LOG_LEVEL": "DEBUG, INFO, WARNING or ERROR (default INFO)",
    INSTANCE_ENV: f"set by the edge agent: echoed in every response's {INSTANCE_HEADER} header, so its "
    "health probes know they reach the instance they started",
}

Mode = Literal["entry-script", "no-code"]


@dataclass(frozen=True)
class WorkerSlot:
    """Which worker process this is, when several share the port (see ``workers.py``)."""

    index: int
    """1-based."""
    count: int
    listen_fd: int
    """The listening socket the supervisor bound and passed down."""
    parent_pid: int
    """The supervisor's pid: a worker whose parent is no longer this pid has lost it (the
    supervisor may itself be pid 1 in a container without an init)."""
    run_dir: Path
    """The supervisor's private folder: the workers' sibling sockets and readiness marks."""

    def env_value(self) -> str:
        """The ``EDGE_SCORING_WORKER`` value that describes this slot."""
        return f"{self.index}/{self.count}/{self.listen_fd}/{self.parent_pid}/{self.run_dir}"

    @classmethod
    def parse(cls, value: str) -> WorkerSlot:
        """The slot from ``env_value``; ConfigError when malformed."""
        parts = value.split("/", 4)
        try:
            index, count, fd, parent = int(parts[0]), int(parts[1]), int(parts[2]), int(parts[3])
            run_dir = Path(parts[4])
        except (ValueError, IndexError):
            raise ConfigError(f"{WORKER_ENV} is malformed: {value!r}") from None
        if not 1 <= index <= count or fd < 0 or parent < 1 or not run_dir.is_absolute():
            raise ConfigError(f"{WORKER_ENV} is malformed: {value!r}")
        return cls(index, count, fd, parent, run_dir)


class ConfigError(ValueError):
    """The configuration is unusable; the message names the setting."""


@dataclass(frozen=True)
class ServerConfig:
    """Everything the server needs to start."""

    mode: Mode
    model_dir: Path | None
    entry_script: Path | None
    host: str
    port: int
    profile: str
    profiles_dir: Path | None
    module: ModuleInfo | None
    model_name: str | None
    scoring_key: str | None = field(repr=False)
    timeout_s: float
    max_request_bytes: int
    threads: int
    max_queue: int
    batching: Batching
    exit_on_init_failure: bool
    log_access: bool
    log_level: str
    instance: str | None = None
    """``$EDGE_INSTANCE_ID``, echoed in the ``X-Edge-Instance`` response header."""
    workers: int | None = None
    """Server processes sharing the port; None: decided from the mode and profile (``workers.py``)."""
    worker: WorkerSlot | None = None
    """Set in a worker process started by the supervisor; ``threads`` is then its share."""

    @property
    def module_name(self) -> str:
        """The module's name: module.json's, else the entry script's, MODEL_NAME or the model folder's."""
        if self.module is not None:
            return self.module.name
        if self.entry_script is not None:
            return self.entry_script.stem
        if self.model_name:
            return self.model_name
        assert self.model_dir is not None
        return self.model_dir.parent.name if self.model_dir.name.isdigit() else self.model_dir.name

    @property
    def module_version(self) -> str:
        """module.json's version, else "1"."""
        return self.module.version if self.module is not None else "1"


def parser() -> argparse.ArgumentParser:
    """The ``edge-score`` command line; ``--help`` documents every environment variable."""
    epilog = "environment variables (flags override them):\n" + "\n".join(
        textwrap.fill(text, 100, initial_indent=f"  {name:<22} ", subsequent_indent=" " * 25)
        for name, text in VARIABLES.items()
    )
    p = argparse.ArgumentParser(
        prog="edge-score",
        description="Serve a model over HTTP: Azure ML-style entry script (score.py) or an ONNX model as is.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model-dir", help="overrides $MODEL_DIR (see below)")
    p.add_argument("--entry-script", help="overrides $ENTRY_SCRIPT (see below)")
    p.add_argument("--host", help="overrides $HOST (see below)")
    p.add_argument("--port", type=int, help="overrides $PORT (see below)")
    p.add_argument("--profile", help="overrides $PROFILE (see below)")
    p.add_argument("--profiles-dir", help="overrides $EDGE_PROFILES_DIR (see below)")
    p.add_argument("--module-json", help="overrides $MODULE_JSON (see below)")
    p.add_argument("--model-name", help="overrides $MODEL_NAME (see below)")
    p.add_argument("--timeout", type=float, help="overrides $SCORING_TIMEOUT (see below)")
    p.add_argument("--threads", type=int, help="overrides $SCORING_THREADS (see below)")
    p.add_argument("--workers", help=f"overrides ${WORKERS_ENV} (see below)")
    p.add_argument(
        "--log-access", action="store_true", default=None, help="overrides $LOG_ACCESS (see below)"
    )
    p.add_argument("--log-level", help="overrides $LOG_LEVEL (see below)")
    return p


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1/true/yes/on or 0/false/no/off, got {raw!r}")


def _number(env: Mapping[str, str], name: str, default: float, *, integer: bool, minimum: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind}, got {raw!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {raw!r}")
    return value


def _batching(env: Mapping[str, str]) -> Batching:
    defaults = Batching()
    size = int(_number(env, BATCH_SIZE_ENV, defaults.max_batch_size, integer=True, minimum=1))
    delay = _number(env, BATCH_DELAY_ENV, defaults.max_batch_delay_ms, integer=False, minimum=0)
    try:
        return Batching(max_batch_size=size, max_batch_delay_ms=delay)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, f"{BATCH_SIZE_ENV}/{BATCH_DELAY_ENV}")) from None


def load_module_info(path: Path) -> ModuleInfo | None:
    """Read module.json when it exists; raise ConfigError naming the bad fields."""
    if not path.is_file():
        return None
    try:
        return ModuleInfo.model_validate_json(path.read_bytes())
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, str(path))) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None


def _module_paths(info: ModuleInfo, module_root: Path) -> tuple[Path | None, Path | None]:
    """MODEL_DIR and ENTRY_SCRIPT as module.json implies them under the module's root."""
    models_root = module_root / "models"
    if len(info.models) == 1:
        model_dir: Path | None = models_root / info.models[0].name / str(info.models[0].version)
    else:
        model_dir = models_root if info.models else None
    script = None
    if info.entry_script:
        given = Path(info.entry_script)
        candidates = [given] if given.is_absolute() else [module_root / given, module_root / "src" / given]
        script = next((c for c in candidates if c.is_file()), candidates[0])
    return model_dir, script


def load_config(env: Mapping[str, str], argv: Sequence[str] | None = None) -> ServerConfig:
    """Build the configuration from ``env`` (usually os.environ) and command-line ``argv``."""
    args = parser().parse_args(argv)

    def pick(flag: object, name: str) -> str | None:
        if flag is not None:
            return str(flag)
        return env.get(name) or None

    module_json = Path(pick(args.module_json, "MODULE_JSON") or DEFAULT_MODULE_JSON)
    info = load_module_info(module_json)
    implied_dir, implied_script = _module_paths(info, module_json.parent) if info else (None, None)

    raw_dir = pick(args.model_dir, "MODEL_DIR") or env.get("AZUREML_MODEL_DIR")
    model_dir = Path(raw_dir) if raw_dir else implied_dir
    raw_script = pick(args.entry_script, "ENTRY_SCRIPT")
    entry_script = Path(raw_script) if raw_script else implied_script
    if entry_script is not None and not entry_script.is_file():
        raise ConfigError(f"ENTRY_SCRIPT: {entry_script} does not exist")
    if model_dir is not None and not model_dir.is_dir():
        raise ConfigError(f"MODEL_DIR: {model_dir} is not a folder")
    if entry_script is None and model_dir is None:
        raise ConfigError("nothing to serve: set ENTRY_SCRIPT (score.py) and/or MODEL_DIR (ONNX model)")

    port = (
        int(args.port) if args.port is not None else int(_number(env, "PORT", 5001, integer=True, minimum=1))
    )
    if not 1 <= port <= 65535:
        raise ConfigError(f"PORT must be between 1 and 65535, got {port}")
    timeout_s = (
        args.timeout
        if args.timeout is not None
        else _number(env, "SCORING_TIMEOUT", 60.0, integer=False, minimum=0.001)
    )
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    try:
        threads = args.threads or allowed_cpus(environ=env)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    workers = _workers(pick(args.workers, WORKERS_ENV))
    raw_slot = env.get(WORKER_ENV)
    worker = WorkerSlot.parse(raw_slot) if raw_slot else None
    if worker is not None:
        threads = max(1, threads // worker.count)
    log_level = (pick(args.log_level, "LOG_LEVEL") or "INFO").upper()
    if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
    profiles_dir = pick(args.profiles_dir, "EDGE_PROFILES_DIR")
    return ServerConfig(
        mode="entry-script" if entry_script is not None else "no-code",
        model_dir=model_dir,
        entry_script=entry_script,
        host=pick(args.host, "HOST") or ("0.0.0.0" if info is not None else "127.0.0.1"),
        port=port,
        profile=pick(args.profile, "PROFILE") or (info.profile if info else "cpu"),
        profiles_dir=Path(profiles_dir) if profiles_dir else None,
        module=info,
        model_name=pick(args.model_name, "MODEL_NAME"),
        scoring_key=env.get("SCORING_KEY") or None,
        timeout_s=float(timeout_s),
        max_request_bytes=int(_number(env, "MAX_REQUEST_BYTES", 16 * 1024 * 1024, integer=True, minimum=1)),
        threads=threads,
        max_queue=int(_number(env, "SCORING_MAX_QUEUE", 256, integer=True, minimum=0)),
        batching=_batching(env),
        exit_on_init_failure=_bool(env, "EXIT_ON_INIT_FAILURE", True),
        log_access=bool(args.log_access) or _bool(env, "LOG_ACCESS", False),
        log_level=log_level,
        instance=env.get(INSTANCE_ENV) or None,
        workers=workers,
        worker=worker,
    )


def _workers(raw: str | None) -> int | None:
    """``SCORING_WORKERS``: None for ``auto`` (or unset), else a positive integer."""
    value = (raw or "").strip().lower()
    if value in ("", "auto"):
        return None
    if not value.isdigit() or int(value) < 1:
        raise ConfigError(f"{WORKERS_ENV} must be 'auto' or a positive integer, got {raw!r}")
    return int(value)
