"""``edgectl demo``: the whole system on this machine, from a trained model to a rolling update.

See ``harness.demo`` for the steps. The demo keeps its own data directory under ``--work`` and
ignores ``--data-dir``/``$EDGE_DATA_DIR``, so it never touches an operator's real data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cloud.commands.base import CliError, add_command

DEFAULT_WORK = Path(".work") / "demo"


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the demo (``harness.demo.run_demo``)."""
    from harness.demo import DemoOptions, run_demo

    if not 0 <= args.simulated <= 10_000:
        raise CliError(f"--simulated {args.simulated}: expected 0..10000")
    return run_demo(DemoOptions(work=Path(args.work).absolute(), simulated=args.simulated))


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the top-level ``demo`` command."""
    p = add_command(
        subparsers,
        "demo",
        cmd_demo,
        help="run the whole system locally: registry, broker, one real and N simulated devices",
        description="Start an image registry and Mosquitto on 127.0.0.1, build the cpu base image "
        "(cached), train, register and package the digits model, provision one real device "
        "(edge-agent with Docker Engine) and N simulated ones, deploy in waves, score the real "
        "module over HTTP, print the fleet, then roll out a second model version (only the model "
        "layer moves). Everything started is stopped at the end or on Ctrl-C. Needs Docker Engine "
        "running (bash scripts/bootstrap.sh starts it).",
        examples="  edgectl demo\n  edgectl demo --simulated 200 --work /tmp/edge-demo",
        json_output=False,
    )
    p.add_argument("--simulated", type=int, default=50, metavar="N", help="simulated devices (default 50)")
    p.add_argument(
        "--work",
        default=str(DEFAULT_WORK),
        metavar="DIR",
        help=f"work folder, emptied first (default {DEFAULT_WORK})",
    )
