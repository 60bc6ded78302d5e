"""The ``edge-agent`` command: ``run``, ``check-config`` and ``status``.

::

    edge-agent run --config /etc/edge-agent/agent.yaml
    edge-agent check-config --config /etc/edge-agent/agent.yaml [--json]
    edge-agent status --config /etc/edge-agent/agent.yaml [--json]

``run`` keeps the device's modules as the desired state says until SIGTERM or SIGINT (modules keep
running after it exits). ``check-config`` validates the file and the files it names and exits 2
naming every problem. ``status`` reads the local state (what was applied, what is known good, the
last report) without the agent or the broker. With the process runtime, module directories are
looked up in the configuration's ``images_dir`` (default ``<state_dir>/images``), or in
``--images-dir`` when given.

Memory: the Docker SDK is imported only for ``runtime: docker`` and the metrics endpoint only
with ``metrics_port``; once the agent is built, what start-up allocated is moved out of the
garbage collector's sight (``gc.freeze``) so idle passes do not walk it again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from agent.agent import STATE_FILE, Agent, agent_version
from agent.config import AgentConfig, load_agent_config
from agent.reporting import read_report
from agent.runtime import ModuleRuntime
from agent.state import AgentState
from modules.contract import format_validation_error
from modules.documents import DocumentError
from modules.pipes import quiet_broken_pipe
from modules.signing import KeyFormatError, load_public_key_file

DEFAULT_CONFIG = Path("/etc/edge-agent/agent.yaml")
EXIT_CONFIG = 2
EXIT_RUNTIME = 3

log = logging.getLogger("agent")


def build_runtime(config: AgentConfig, images_dir: Path | None = None) -> ModuleRuntime:
    """The module runtime the configuration names (Docker Engine or local processes)."""
    credentials = {name: (s.username, s.read_password()) for name, s in config.registry_secrets.items()}
    puller, pulls = config.pull.puller(config.state_dir), config.pull.tracker()
    if config.runtime == "process":
        from agent.runtime.process import ProcessRuntime

        return ProcessRuntime(
            config.state_dir,
            images_dir or config.images_dir,
            credentials=credentials,
            sealing_key=config.sealing_private_key(),
            device_id=config.device_id,
            puller=puller,
            pulls=pulls,
            images=config.pull.image_book(config.state_dir),
            gc_grace=timedelta(seconds=config.pull.gc_grace_s),
        )
    from agent.runtime.docker import DockerRuntime

    return DockerRuntime(
        device_id=config.device_id,
        credentials=credentials,
        sealing_key=config.sealing_private_key(),
        puller=puller,
        pulls=pulls,
        images=config.pull.image_book(config.state_dir),
        gc_grace=timedelta(seconds=config.pull.gc_grace_s),
    )


async def run_agent(config: AgentConfig, images_dir: Path | None = None) -> None:
    """Run the agent until SIGTERM/SIGINT: link, metrics endpoint and reconcile loop."""
    from agent.health import HealthProber
    from agent.link import Link
    from agent.metrics import AgentMetrics, MetricsServer

    public_key = load_public_key_file(config.cloud_public_key)
    runtime = await asyncio.to_thread(build_runtime, config, images_dir)
    metrics = AgentMetrics()
    try:
        async with Link(config) as link, contextlib.AsyncExitStack() as stack:
            if config.metrics_port:
                await stack.enter_async_context(MetricsServer(metrics, config.metrics_port))
            prober = HealthProber(start_period_s=config.health_start_period_s)
            agent = Agent(config, runtime, link, public_key=public_key, metrics=metrics, prober=prober)
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, agent.stop)
            log.info(
                "edge-agent %s for device %s (%s runtime)", agent.version, config.device_id, config.runtime
            )
            gc.collect()
            gc.freeze()
            await agent.run()
            log.info("stopping; modules keep running")
    finally:
        await runtime.close()


def _load(path: Path) -> AgentConfig:
    try:
        return load_agent_config(path)
    except DocumentError as exc:
        raise SystemExit(_fail(str(exc))) from None
    except ValidationError as exc:
        raise SystemExit(_fail(format_validation_error(exc, str(path)))) from None


def _fail(message: str) -> int:
    print(message, file=sys.stderr)
    return EXIT_CONFIG


def _print(data: Any, as_json: bool, text: str) -> None:
    print(orjson.dumps(data, option=orjson.OPT_INDENT_2, default=str).decode() if as_json else text)


def cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    try:
        asyncio.run(run_agent(config, args.images_dir))
    except KeyFormatError as exc:
        return _fail(f"{args.config}: cloud_public_key: {exc}")
    except Exception as exc:
        log.exception("edge-agent cannot run: %s", exc)
        return EXIT_RUNTIME
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args.config)
    try:
        load_public_key_file(config.cloud_public_key)
        config.broker.read_password()
        for secret in config.registry_secrets.values():
            secret.read_password()
    except (KeyFormatError, DocumentError, OSError) as exc:
        return _fail(f"{args.config}: {exc}")
    summary = {
        "config": str(args.config),
        "device_id": config.device_id,
        "broker": config.broker.url,
        "mqtt_username": config.mqtt_username,
        "runtime": config.runtime,
        "state_dir": str(config.state_dir),
        "images_dir": str(config.images_dir) if config.runtime == "process" else None,
        "health_start_period_s": config.health_start_period_s,
        "metrics": f"http://127.0.0.1:{config.metrics_port}/metrics" if config.metrics_port else None,
        "registry_secrets": sorted(config.registry_secrets),
    }
    text = "\n".join(f"{k}: {v}" for k, v in summary.items()) + "\nconfiguration OK"
    _print({**summary, "ok": True}, args.json, text)
    return 0


def _read_state(state_dir: Path) -> AgentState | None:
    """The stored state, read only (no quarantine, no clean-up: the agent may be running)."""
    for path in (state_dir / STATE_FILE, state_dir / f"{STATE_FILE}.prev"):
        try:
            return AgentState.model_validate_json(path.read_bytes())
        except (FileNotFoundError, ValidationError):
            continue
    return None


def cmd_status(args: argparse.Namespace) -> int:
    config = _load(args.config)
    try:
        state = _read_state(config.state_dir)
        report = read_report(config.state_dir)
    except OSError as exc:
        print(
            f"edge-agent: cannot read the state in {config.state_dir}: {exc.strerror or exc} "
            "(run as root or as the agent's user)",
            file=sys.stderr,
        )
        return 1
    data: dict[str, Any] = {
        "device_id": config.device_id,
        "state_dir": str(config.state_dir),
        "generation_applied": state.last_applied.generation if state and state.last_applied else None,
        "last_known_good": state.last_known_good.generation if state and state.last_known_good else None,
        "status": state.status if state else None,
        "reason": state.reason if state else None,
        "applied_at": state.applied_at if state else None,
        "last_report": report.model_dump(mode="json") if report else None,
    }
    lines = [
        f"device {config.device_id} (state in {config.state_dir})",
        f"applied generation: {data['generation_applied'] or 'none'} ({data['status'] or 'nothing applied'})",
        f"last known good: {data['last_known_good'] or 'none'}",
    ]
    if data["reason"]:
        lines.append(f"reason: {data['reason']}")
    if report is not None:
        lines.append(
            f"last report {report.reported_at.isoformat()}: {report.deployment_status}"
            + (f" ({report.reason})" if report.reason else "")
        )
        for name, m in sorted(report.modules.items()):
            extra = f" restarts={m.restart_count}" if m.restart_count else ""
            lines.append(f"  {name}: {m.runtime_status}{extra} {m.image or ''}".rstrip())
            if m.pull is not None:
                lines.append(f"    {m.pull.describe()}")
            if m.message:
                lines.append(f"    {m.message}")
    _print(data, args.json, "\n".join(lines))
    return 0


def config_schema() -> dict[str, Any]:
    """The JSON Schema of the agent's configuration file (also shipped as cloud/agent_config.schema.json)."""
    return AgentConfig.model_json_schema()


def cmd_schema(_args: argparse.Namespace) -> int:
    print(orjson.dumps(config_schema(), option=orjson.OPT_INDENT_2).decode())
    return 0


def parser() -> argparse.ArgumentParser:
    """The ``edge-agent`` argument parser."""
    p = argparse.ArgumentParser(prog="edge-agent", description="Keep this device's edge modules running.")
    p.add_argument("--version", action="version", version=f"edge-agent {agent_version()}")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str, json_flag: bool = True) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_)
        c.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=f"default {DEFAULT_CONFIG}")
        if json_flag:
            c.add_argument("--json", action="store_true", help="print JSON")
        return c

    run = command("run", "run the agent until SIGTERM", json_flag=False)
    run.add_argument(
        "--images-dir", type=Path, help="process runtime: unpacked modules (overrides images_dir)"
    )
    run.set_defaults(func=cmd_run)
    command("check-config", "validate the configuration and the files it names").set_defaults(
        func=cmd_check_config
    )
    command("status", "show the local state: applied, known good, last report").set_defaults(func=cmd_status)
    schema = sub.add_parser("schema", help="print the JSON Schema of agent.yaml")
    schema.set_defaults(func=cmd_schema)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``edge-agent`` console script."""
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        return int(args.func(args))
    except BrokenPipeError:
        return quiet_broken_pipe()
