"""``edgectl logs`` and ``edgectl restart``: commands round-tripped to one device over MQTT."""

from __future__ import annotations

import argparse

from cloud.commands.base import EXIT_FAILURE, CliError, add_command, print_json, store_errors
from cloud.commands.deploy import add_broker_option, endpoint_from, open_fleet
from cloud.fleet.commands import DEFAULT_TIMEOUT_S, CommandError, run_command
from edgemqtt.endpoint import BrokerUnavailable
from modules.contract import CommandName, CommandResponse

MAX_TAIL = 10000


def _run(args: argparse.Namespace, command: CommandName, tail: int = 100) -> CommandResponse:
    endpoint = endpoint_from(args)
    with open_fleet(args) as fleet, store_errors():
        try:
            return run_command(
                fleet.db,
                endpoint,
                args.device,
                command,
                module=args.module,
                tail=tail,
                timeout_s=args.timeout,
            )
        except (CommandError, BrokerUnavailable) as e:
            raise CliError(str(e), EXIT_FAILURE) from e


def _finish(args: argparse.Namespace, response: CommandResponse, done: str) -> int:
    if args.json:
        print_json(response.model_dump(mode="json"))
    elif response.ok:
        print(response.output if response.output else done)
    if not response.ok:
        raise CliError(f"device {args.device}: {response.error or 'command failed'}", EXIT_FAILURE)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    """Print the last lines of a module's log."""
    if not 1 <= args.tail <= MAX_TAIL:
        raise CliError(f"--tail {args.tail}: give a number of lines from 1 to {MAX_TAIL}")
    return _finish(args, _run(args, "logs", args.tail), "(no log lines)")


def cmd_restart(args: argparse.Namespace) -> int:
    """Restart a module on a device."""
    return _finish(args, _run(args, "restart"), f"restarted {args.module} on {args.device}")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("device", metavar="DEVICE")
    p.add_argument("module", metavar="MODULE")
    p.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="how long to wait for the answer",
    )
    add_broker_option(p)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the top-level ``logs`` and ``restart`` commands."""
    p = add_command(
        subparsers,
        "logs",
        cmd_logs,
        help="show a module's log from a device",
        description="Ask a device for the last lines of a module's log (over MQTT). Refused at once when the "
        "device is offline.",
        examples="  edgectl logs cam-1 detector --tail 50",
    )
    _common(p)
    p.add_argument("--tail", type=int, default=100, metavar="N", help="number of lines (1-10000)")

    p = add_command(
        subparsers,
        "restart",
        cmd_restart,
        help="restart a module on a device",
        description="Ask a device to restart one module (over MQTT). Refused at once when the device is "
        "offline.",
        examples="  edgectl restart cam-1 detector",
    )
    _common(p)
