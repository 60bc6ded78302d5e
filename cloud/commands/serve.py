"""``edgectl serve``: the operator REST API over the same data directory and database as the CLI."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from aiohttp import web

from cloud.api.app import create_app
from cloud.api.auth import TOKEN_ENV, TOKEN_FILE, TokenError, load_tokens
from cloud.api.context import DEFAULT_UPLOAD_MAX, Services
from cloud.api.controller import DEFAULT_INTERVAL_S
from cloud.broker_rabbitmq import REPORTS_QUEUE
from cloud.commands.base import EXIT_FAILURE, CliError, add_command, settings_from, store_errors
from cloud.commands.deploy import (
    add_broker_option,
    add_reports_queue_option,
    endpoint_from,
    reports_queue_from,
)
from cloud.keys import KeyFileError
from modules.documents import DocumentError
from modules.hosts import is_loopback

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs id=%{X-Request-Id}o'


def cmd_serve(args: argparse.Namespace) -> int:
    """Serve the REST API until interrupted."""
    if not 0 < args.port < 65536:
        raise CliError(f"--port {args.port}: give a port from 1 to 65535")
    if args.max_upload_mb <= 0:
        raise CliError(f"--max-upload-mb {args.max_upload_mb}: give a positive size")
    if args.interval <= 0:
        raise CliError(f"--interval {args.interval}: give a positive number of seconds")
    if args.reports_queue and args.no_controller:
        raise CliError("--reports-queue feeds the controller: it cannot go with --no-controller")
    settings = settings_from(args)
    token_file = Path(args.token_file) if args.token_file else settings.data_dir / TOKEN_FILE
    try:
        tokens = load_tokens(token_file)
    except TokenError as e:
        raise CliError(str(e), EXIT_FAILURE) from e
    endpoint = endpoint_from(args)
    with store_errors():
        try:
            services = Services.open(settings, endpoint, upload_max=int(args.max_upload_mb * 1024 * 1024))
        except KeyFileError as e:
            raise CliError(str(e), EXIT_FAILURE) from e
        except DocumentError as e:
            raise CliError(f"device profiles: {e}", EXIT_FAILURE) from e
    reports_queue = reports_queue_from(args.reports_queue, endpoint)
    app = create_app(
        services,
        tokens,
        controller_interval_s=None if args.no_controller else args.interval,
        reports_queue=reports_queue,
        dashboard=not args.no_dashboard,
    )
    if tokens.generated:
        print(f"generated an operator token (shown once; stored in {tokens.source}):", flush=True)
        print(tokens.generated, flush=True)
    if not is_loopback(args.host):
        print(
            f"warning: --host {args.host} is not a loopback address and the API speaks plain HTTP: "
            "put it behind a TLS proxy",
            file=sys.stderr,
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    controller = "off" if args.no_controller else f"on, broker {endpoint.url}"
    if reports_queue:
        controller += f", reports from RabbitMQ queue {REPORTS_QUEUE}"
    dashboard = "" if args.no_dashboard else f"dashboard at http://{args.host}:{args.port}/ui/; "
    try:
        web.run_app(
            app,
            host=args.host,
            port=args.port,
            access_log_format=ACCESS_LOG_FORMAT,
            print=lambda _message: print(
                f"edgectl serve: listening on http://{args.host}:{args.port} (tokens from {tokens.source}; "
                f"OpenAPI at /openapi.json; {dashboard}controller {controller})",
                flush=True,
            ),
        )
    except OSError as e:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}", EXIT_FAILURE) from e
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the top-level ``serve`` command."""
    p = add_command(
        subparsers,
        "serve",
        cmd_serve,
        help="serve the operator REST API",
        description="Serve models, devices, deployments and rollout status over HTTP (aiohttp), with an "
        "OpenAPI document at /openapi.json. Every route except /healthz and /openapi.json needs "
        f"'Authorization: Bearer <token>'; tokens come from ${TOKEN_ENV} or the token file (generated on "
        "first use, mode 0600, the new token printed once). Unless --no-controller, the server also "
        "runs the rollout controller (as 'edgectl deploy watch' does). The operator dashboard is at /ui/ "
        "(log in with an operator token; unless --no-dashboard).",
        examples="  edgectl serve\n"
        "  edgectl serve --port 9000 --token-file /etc/edgedeploy/api-tokens\n"
        f"  {TOKEN_ENV}=... edgectl serve --no-controller\n"
        '  curl -H "Authorization: Bearer $(tail -1 ~/.edgedeploy/api-tokens)" http://127.0.0.1:8080/models',
        json_output=False,
    )
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"operator tokens, one per line (default <data dir>/{TOKEN_FILE})",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_UPLOAD_MAX / 1024 / 1024,
        metavar="MB",
        help=f"largest model upload (default {DEFAULT_UPLOAD_MAX // 1024**3} GiB)",
    )
    p.add_argument("--no-controller", action="store_true", help="do not ingest reports or advance rollouts")
    p.add_argument(
        "--no-dashboard",
        action="store_true",
        help="serve the REST API only (no operator dashboard under /ui/)",
    )
    p.add_argument(
        "--interval",
        type=float,
        default=DEFAULT_INTERVAL_S,
        metavar="SECONDS",
        help=f"controller pass interval (default {DEFAULT_INTERVAL_S:g})",
    )
    add_reports_queue_option(p)
    add_broker_option(p)
