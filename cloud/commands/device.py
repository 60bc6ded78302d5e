"""``edgectl device``: provision devices (MQTT credentials, broker files, agent config), list, tag, remove."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from cloud.broker import BrokerError, resolve_endpoint
from cloud.commands.base import (
    EXIT_FAILURE,
    CliError,
    add_command,
    format_table,
    parse_key_values,
    print_json,
    settings_from,
    store_errors,
)
from cloud.commands.deploy import add_broker_option, endpoint_from
from cloud.commands.views import module_lines
from cloud.devices import DEFAULT_PROFILE, DEFAULT_STATE_DIR, AgentBundle, DeviceManager, reload_if_configured
from cloud.fleet.device_state import DeviceState
from cloud.keys import KeyFileError
from edgemqtt.endpoint import Endpoint
from modules.contract import utcnow


@contextmanager
def _devices(args: argparse.Namespace) -> Iterator[DeviceManager]:
    with store_errors():
        try:
            manager = DeviceManager.open(settings_from(args))
        except (BrokerError, KeyFileError) as e:
            raise CliError(str(e), EXIT_FAILURE) from e
        try:
            yield manager
        except (BrokerError, KeyFileError) as e:
            raise CliError(str(e), EXIT_FAILURE) from e
        finally:
            manager.close()


def _reload_note(manager: DeviceManager) -> str:
    try:
        return reload_if_configured(manager.paths)
    except BrokerError as e:
        return f"broker files updated, but the broker was not reloaded: {e}"


def _cloud_endpoint(args: argparse.Namespace) -> Endpoint | None:
    """The cloud's own broker endpoint (``add --broker-url`` is the agent's); None when unusable."""
    try:
        return resolve_endpoint(settings_from(args).data_dir)
    except (ValueError, BrokerError):
        return None


def _tags(tags: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in tags.items())


def cmd_add(args: argparse.Namespace) -> int:
    """Provision a device and write its agent configuration."""
    bundle = AgentBundle(
        out_dir=Path(args.out) if args.out else None,
        broker_url=args.broker_url,
        ca_file=Path(args.ca) if args.ca else None,
        state_dir=args.state_dir,
        runtime=args.runtime,
        force=args.force,
    )
    with _devices(args) as manager:
        result = manager.add(
            args.id,
            profile=args.profile,
            tags=parse_key_values(args.tag, "--tag"),
            bundle=bundle,
            endpoint=_cloud_endpoint(args),
        )
        note = _reload_note(manager)
    if args.json:
        shown = result if args.show_password else result.without_password()
        print_json(shown.model_copy(update={"broker": note}).model_dump(mode="json"))
    else:
        print(f"added device {result.device.id} (profile {result.device.profile})")
        print(f"agent configuration: {result.config_file} (holds the MQTT password; copy it to the device)")
        if args.show_password:
            print(f"MQTT password (shown once): {result.password}")
    print(note, file=sys.stderr)
    return 0


def _ago(at: datetime | None, now: datetime) -> str:
    if at is None:
        return "-"
    seconds = max(0, int((now - at).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _modules(state: DeviceState | None) -> str:
    if state is None or not state.modules:
        return "-"
    return f"{state.modules_healthy}/{len(state.modules)}"


def cmd_list(args: argparse.Namespace) -> int:
    """List devices with what the fleet knows of them now."""
    with _devices(args) as manager:
        devices = manager.list_devices(
            tags=parse_key_values(args.tag, "--tag"), profiles=[args.profile] if args.profile else None
        )
    if args.status:
        devices = [d for d in devices if d.state is not None and d.state.presence == args.status]
    if args.json:
        print_json([d.model_dump(mode="json") for d in devices])
        return 0
    if not devices:
        print("no devices", file=sys.stderr)
        return 0
    now = utcnow()
    rows = []
    for d in devices:
        st = d.state
        rows.append(
            (
                d.id,
                st.presence if st else "-",
                _ago(st.last_seen if st else None, now),
                d.profile,
                st.agent_version or "-" if st else "-",
                "-" if st is None or st.generation_applied is None else str(st.generation_applied),
                st.deployment_status or "-" if st else "-",
                _modules(st),
                _tags(d.tags),
            )
        )
    print(
        format_table(
            ("ID", "PRESENCE", "LAST SEEN", "PROFILE", "AGENT", "GEN", "STATUS", "MODULES", "TAGS"), rows
        )
    )
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Show one device: registration, presence, deployment status, modules."""
    with _devices(args) as manager:
        view = manager.show(args.id)
    if args.json:
        print_json(view.model_dump(mode="json"))
        return 0
    now = utcnow()
    st = view.state
    fields = [
        ("id", view.id),
        ("profile", view.profile),
        ("tags", _tags(view.tags) or "-"),
        ("created", view.created_at.isoformat()),
    ]
    if st is not None:
        since = f" since {st.since.isoformat(timespec='seconds')}" if st.since else ""
        fields += [
            ("presence", st.presence + since),
            ("last seen", _ago(st.last_seen, now)),
            ("agent", st.agent_version or "-"),
            ("deployment", st.deployment or "-"),
            ("generation", f"applied {st.generation_applied}, desired {st.generation_desired}"),
            ("status", (st.deployment_status or "-") + (f": {st.reason}" if st.reason else "")),
        ]
        if st.last_rejection is not None:
            r = st.last_rejection
            gen = f" (generation {r.generation})" if r.generation is not None else ""
            fields.append(("rejected", f"{r.at.isoformat(timespec='seconds')}{gen} {r.code}: {r.reason}"))
        if st.client_conflict is not None:
            fields.append(("CONFLICT", st.client_conflict.detail))
        if st.accelerators:
            fields.append(("accel", ", ".join(f"{a.kind} {a.path}" for a in st.accelerators)))
        if st.system is not None:
            sysm = st.system
            fields.append(
                (
                    "system",
                    f"cpu {sysm.cpu_percent:.0f}%, "
                    f"memory {sysm.memory_used_mb:.0f}/{sysm.memory_total_mb:.0f} MB, "
                    f"disk free {sysm.disk_free_mb:.0f} MB"
                    + (f", {sysm.temperature_c:.0f} °C" if sysm.temperature_c is not None else ""),
                )
            )
            warning = sysm.disk_warning()
            if warning is not None:
                fields.append(("WARNING", warning))
    print("\n".join(f"{k + ':':<11} {v}" for k, v in fields))
    if st is not None and st.modules:
        print("modules:")
        print("\n".join(module_lines(st.modules)))
    return 0


def cmd_tag(args: argparse.Namespace) -> int:
    """Set or remove tags."""
    with _devices(args) as manager:
        view = manager.tag(args.id, parse_key_values(args.tags, "tag"), args.remove or ())
    if args.json:
        print_json(view.model_dump(mode="json"))
    else:
        print(f"{view.id}: {_tags(view.tags) or 'no tags'}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    """Remove a device, its credentials and fleet state, and clear its retained MQTT messages."""
    endpoint = endpoint_from(args)
    with _devices(args) as manager:
        view = manager.remove(args.id)
        note = _reload_note(manager)
        cleared = manager.clear_removed(endpoint)
    if args.json:
        print_json(
            {
                "removed": view.model_dump(mode="json"),
                "broker": note,
                "retained_cleared": cleared.cleared,
                "retained_pending": cleared.pending,
                "error": cleared.error,
            }
        )
    else:
        print(f"removed device {view.id}; its MQTT credentials are gone from the password file")
    print(note, file=sys.stderr)
    if cleared.pending:
        print(
            f"warning: {cleared.error}\nwarning: the retained messages of {', '.join(cleared.pending)} "
            "are not cleared yet; 'edgectl deploy publish', 'deploy watch' or 'edgectl serve' clears "
            "them once the broker is back (until then the id cannot be added again)",
            file=sys.stderr,
        )
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``device`` group."""
    group = subparsers.add_parser(
        "device",
        help="provision and manage devices",
        description="Provision devices: each gets MQTT credentials (only a hash is stored), a place in the "
        "broker's password and ACL files, and a ready agent configuration.",
    )
    commands = group.add_subparsers(dest="device_command", metavar="COMMAND", required=True)

    p = add_command(
        commands,
        "add",
        cmd_add,
        help="provision a device and write its agent configuration",
        description="Provision device ID: create its MQTT password, add it to the broker's password file "
        "and write DIR/agent.yaml (with the password, mode 0600), the cloud's public signing key and, for "
        "TLS, the broker's CA. The broker is reloaded when `edgectl broker config` recorded its pid file.",
        examples="  edgectl device add pump-17 --tag site=plant-a --profile cpu\n"
        "  edgectl device add cam-3 --profile openvino-myriad --out ./cam-3 --runtime process\n"
        "  edgectl device add gw-1 --broker-url mqtts://broker.example.com:8883 --ca ca.pem --json",
    )
    p.add_argument(
        "id", metavar="ID", help="device id (also its MQTT username): lowercase letters, digits, -_."
    )
    p.add_argument("--tag", action="append", metavar="KEY=VALUE", help="tag the device (repeatable)")
    p.add_argument("--profile", default=DEFAULT_PROFILE, help=f"device profile (default {DEFAULT_PROFILE})")
    p.add_argument("--out", metavar="DIR", help="agent configuration folder (default <data dir>/devices/ID)")
    p.add_argument(
        "--broker-url",
        metavar="URL[,URL...]",
        help="broker URL for the agent, or the comma-separated nodes of a cluster "
        "(default: from broker config)",
    )
    p.add_argument(
        "--ca", metavar="FILE", help="CA the agent trusts for mqtts:// (default: from broker config)"
    )
    p.add_argument(
        "--state-dir", default=DEFAULT_STATE_DIR, help=f"agent state folder (default {DEFAULT_STATE_DIR})"
    )
    p.add_argument("--runtime", choices=("docker", "process"), default="docker", help="module runtime")
    p.add_argument("--force", action="store_true", help="overwrite an existing agent.yaml in DIR")
    p.add_argument("--show-password", action="store_true", help="also print the MQTT password once")

    p = add_command(
        commands,
        "list",
        cmd_list,
        help="list devices",
        description="List devices with their presence (online, offline, stale: no report for 3 heartbeats, "
        "or never seen), last seen, agent version, applied generation, deployment status and healthy/total "
        "modules; optionally only those with given tags, profile or presence.",
        examples="  edgectl device list\n  edgectl device list --tag site=plant-a --json\n"
        "  edgectl device list --status stale",
    )
    p.add_argument(
        "--tag", action="append", metavar="KEY=VALUE", help="only devices with this tag (repeatable)"
    )
    p.add_argument("--profile", help="only devices of this profile")
    p.add_argument(
        "--status",
        choices=("online", "offline", "stale", "never seen"),
        help="only devices with this presence",
    )

    p = add_command(
        commands,
        "show",
        cmd_show,
        help="show a device",
        description="Show a device: profile and tags, presence and since when, last seen, agent version, "
        "generations, deployment status and reason, last rejection, a client-id conflict, accelerators, "
        "system metrics, and per module: runtime status, exit code, restarts, image digest, execution "
        "provider and precision, health and probe latency.",
        examples="  edgectl device show pump-17 --json",
    )
    p.add_argument("id", metavar="ID")

    p = add_command(
        commands,
        "tag",
        cmd_tag,
        help="set or remove a device's tags",
        description="Set tags (KEY=VALUE) and remove tags (--remove KEY) of a device.",
        examples="  edgectl device tag pump-17 site=plant-b ring=canary\n"
        "  edgectl device tag pump-17 --remove ring",
    )
    p.add_argument("id", metavar="ID")
    p.add_argument("tags", nargs="*", metavar="KEY=VALUE", help="tags to set")
    p.add_argument("--remove", action="append", metavar="KEY", help="tag to remove (repeatable)")

    p = add_command(
        commands,
        "remove",
        cmd_remove,
        help="remove a device and its credentials",
        description="Remove a device: its row, its password file entry, its default agent configuration "
        "folder and its fleet state (desired state, last report, rollout membership), and clear its "
        "retained MQTT messages (desired, reported, online) so that nothing stale reaches a device added "
        "later under the same id. When the broker is down the clearing is pending: 'deploy publish', "
        "'deploy watch' or 'edgectl serve' does it later. On reload (SIGHUP, sent when broker config "
        "recorded a pid file) Mosquitto closes the device's open session and refuses it from then on.",
        examples="  edgectl device remove pump-17\n  edgectl device remove pump-17 --broker-url mqtt://127.0.0.1:1883",
    )
    p.add_argument("id", metavar="ID")
    add_broker_option(p)
