"""``edgectl credential``: registry credentials that deployments name and devices get sealed.

The password comes from an environment variable, a file or stdin, never from the command line
(it would sit in the shell history and the process list) and never from a manifest. Nothing
prints it back: ``list`` shows names, registries, usernames, revisions and users.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from cloud.commands.base import CliError, add_command, format_table, print_json, store_errors
from cloud.commands.deploy import add_broker_option, endpoint_from, open_fleet, tell_publish


def _password(args: argparse.Namespace) -> str:
    given = [n for n in ("password_env", "password_file", "password_stdin") if getattr(args, n)]
    if len(given) != 1:
        raise CliError(
            "give the password with exactly one of --password-env VAR, --password-file FILE, --password-stdin"
        )
    if args.password_env:
        value = os.environ.get(args.password_env)
        if value is None:
            raise CliError(f"--password-env {args.password_env}: the variable is not set")
        return value
    if args.password_file:
        try:
            return Path(args.password_file).read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as e:
            raise CliError(f"--password-file {args.password_file}: {e.strerror or e}") from e
    return sys.stdin.readline().rstrip("\r\n")


def cmd_set(args: argparse.Namespace) -> int:
    """Create or rotate a registry credential."""
    password = _password(args)
    endpoint = endpoint_from(args)
    with open_fleet(args) as fleet, store_errors():
        revision, created, new, report = fleet.set_credential(
            args.name, args.registry, args.username, password, endpoint=endpoint
        )
    if args.json:
        print_json(
            {
                "name": args.name,
                "revision": revision,
                "created": created,
                "new_generations": new,
                "publish": dataclasses.asdict(report),
            }
        )
    else:
        verb = "created" if created else f"set (revision {revision})"
        print(
            f"registry credential {args.name} for {args.registry} {verb}: {new} new desired state(s), "
            f"{report.published} published, {report.pending} pending"
        )
    tell_publish(report)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    """List registry credentials (never their passwords)."""
    with open_fleet(args) as fleet, store_errors():
        rows = fleet.credentials()
    if args.json:
        print_json([{**dataclasses.asdict(r), "updated_at": r.updated_at.isoformat()} for r in rows])
        return 0
    if not rows:
        print("no registry credentials", file=sys.stderr)
        return 0
    print(
        format_table(
            ("NAME", "REGISTRY", "USERNAME", "REVISION", "UPDATED", "USED BY"),
            [
                (
                    r.name,
                    r.registry,
                    r.username,
                    r.revision,
                    f"{r.updated_at:%Y-%m-%d %H:%M:%SZ}",
                    ",".join(r.used_by) or "-",
                )
                for r in rows
            ],
        )
    )
    return 0


def _users(names: list[str]) -> str:
    return ",".join(names) or "-"


def cmd_remove(args: argparse.Namespace) -> int:
    """Remove a registry credential that no deployment lists."""
    with open_fleet(args) as fleet, store_errors():
        fleet.remove_credential(args.name)
    if args.json:
        print_json({"removed": args.name})
    else:
        print(f"removed registry credential {args.name}")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``credential`` group."""
    group = subparsers.add_parser(
        "credential",
        help="registry credentials deployments pull with (sealed to each device)",
        description="Name registry credentials once; a deployment lists them under registry_credentials and "
        "each targeted device gets the password sealed to its own key. Passwords are never printed.",
    )
    commands = group.add_subparsers(dest="credential_command", metavar="COMMAND", required=True)
    p = add_command(
        commands,
        "set",
        cmd_set,
        help="create or rotate a credential",
        description="Store a registry credential, or change it (a new revision): the devices that use it get "
        "a new desired state with only the credential changed; their modules keep running.",
        examples="  REG_PASSWORD=... edgectl credential set site-reg --registry 10.0.0.5:5000 "
        "--username puller --password-env REG_PASSWORD\n"
        "  edgectl credential set site-reg --registry 10.0.0.5:5000 --username puller --password-file pw",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--registry", required=True, metavar="HOST[:PORT]", help="the registry it is for")
    p.add_argument("--username", required=True)
    p.add_argument("--password-env", metavar="VAR", help="read the password from this environment variable")
    p.add_argument("--password-file", metavar="FILE", help="read the password from the first line of FILE")
    p.add_argument(
        "--password-stdin", action="store_true", help="read the password from the first line of stdin"
    )
    add_broker_option(p)

    add_command(
        commands,
        "list",
        cmd_list,
        help="list credentials",
        description="Name, registry, username, revision and the deployments that use each credential; "
        "never a password.",
        examples="  edgectl credential list --json",
    )
    p = add_command(
        commands,
        "remove",
        cmd_remove,
        help="remove a credential",
        description="Delete a credential; refused while a deployment lists it under registry_credentials.",
        examples="  edgectl credential remove site-reg",
    )
    p.add_argument("name", metavar="NAME")
