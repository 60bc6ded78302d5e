"""``edgectl``: the operator's command line.

Command groups live in ``cloud.commands``, and ``simulate``/``demo`` in the harness (``harness``,
which drives agents and cloud together: this file is the only one that imports it; the agent side
is imported only when those commands run). Each module in ``GROUPS`` adds its subcommands through
``register(subparsers)``. Exit status: 0 success, 1 an operation failed (disk full, corrupt blob,
database unreachable), 2 bad usage or input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType

from cloud.commands import (
    broker,
    credential,
    deploy,
    device,
    device_ops,
    model,
    package,
    schema,
    serve,
)
from cloud.commands.base import EXIT_FAILURE, EXIT_USAGE, CliError, add_global_options
from harness import demo_command, simulate_command
from modules.pipes import quiet_broken_pipe

GROUPS: tuple[ModuleType, ...] = (
    model,
    package,
    device,
    broker,
    credential,
    deploy,
    device_ops,
    serve,
    simulate_command,
    demo_command,
    schema,
)

EPILOG = """\
examples:
  edgectl model register digits.onnx --name digits --tag stage=dev
  edgectl base build --profile cpu
  edgectl package --model digits:1 --config inference.yaml --profile cpu
  edgectl broker config --out /etc/edgedeploy/broker && mosquitto -c /etc/edgedeploy/broker/mosquitto.conf
  edgectl device add cam-1 --tag site=lab --profile cpu
  edgectl deploy apply -f deployment.yaml && edgectl deploy status vision
  edgectl --db-url postgresql://edge@127.0.0.1/edge model list --json
  edgectl schema deployment > deployment.schema.json

environment:
  EDGE_DATA_DIR   data directory (default ~/.edgedeploy)
  EDGE_DB_URL     database URL (default SQLite in the data directory)

exit status: 0 ok, 1 operation failed, 2 bad usage or input, 130 interrupted, 141 output pipe closed
"""


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser with every group registered."""
    parser = argparse.ArgumentParser(
        prog="edgectl",
        description="Register models, package them into edge modules and deploy them to device fleets.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_global_options(parser)
    groups = parser.add_subparsers(dest="group", metavar="GROUP")
    for group in GROUPS:
        group.register(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``edgectl`` with ``argv`` (default: the process arguments); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args))
    except BrokenPipeError:
        return quiet_broken_pipe()
    except CliError as e:
        for line in str(e).splitlines() or [""]:
            print(f"edgectl: error: {line}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("edgectl: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        else:
            print(
                f"edgectl: error: unexpected {type(e).__name__}: {e} (run with --debug for the traceback)",
                file=sys.stderr,
            )
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
