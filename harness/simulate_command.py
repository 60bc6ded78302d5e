"""``edgectl simulate``: run N simulated devices (real agents, simulated modules) against a broker.

Credentials come from one of three places: ``--provision`` registers (or re-keys) devices
``sim-00001``… in the cloud's device table with the profiles of ``--profile-mix``, rewrites the
broker's password and ACL files, reloads the broker when ``edgectl broker config`` recorded its pid
file, and saves the passwords to ``<data dir>/simulate/credentials.json`` (mode 0600);
``--credentials FILE`` reuses such a file; with neither, devices connect anonymously (a local
test broker). The agent code is imported only when this command runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloud import broker
from cloud.broker_rabbitmq import rabbit_password_hash
from cloud.commands.base import EXIT_FAILURE, CliError, add_command, print_json, settings_from, store_errors
from cloud.config import Settings
from cloud.devices import check_broker_url, check_device_id, reload_if_configured
from cloud.keys import KeyFileError, public_key_bytes
from cloud.store.db import open_database
from cloud.store.devices import Device, DeviceTag, find_devices, password_hashes
from cloud.store.errors import InvalidInputError

if TYPE_CHECKING:
    from harness.simulate import SimDevice, Snapshot

CREDENTIALS_FILE = Path("simulate") / "credentials.json"
SIM_TAG = ("simulated", "true")
MAX_DEVICES = 100_000
AUTO_SPLIT = 2_000
"""From this many devices on, ``--processes`` defaults to one worker per core."""


def _range(text: str, option: str) -> tuple[float, float]:
    low, sep, high = text.partition("-")
    try:
        pair = (float(low), float(high if sep else low))
    except ValueError:
        raise CliError(f"{option} {text!r}: expected SECONDS or LOW-HIGH seconds, e.g. 0.5-2") from None
    if not 0 <= pair[0] <= pair[1]:
        raise CliError(f"{option} {text!r}: expected 0 <= LOW <= HIGH")
    return pair


def _probability(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CliError(f"{option} {text!r}: expected a probability between 0 and 1") from None
    if not 0 <= value <= 1:
        raise CliError(f"{option} {text!r}: expected a probability between 0 and 1")
    return value


def provision(settings: Settings, plan: Sequence[tuple[str, str]]) -> dict[str, dict[str, str]]:
    """Create or re-key the devices of ``plan`` (``(id, profile)``); ``{id: {profile, password}}``.

    One transaction and one rewrite of the broker files for the whole batch (``device add`` would
    rewrite them once per device). Existing devices get a new password and the given profile.
    """
    paths = broker.BrokerPaths.of(settings.data_dir)
    out: dict[str, dict[str, str]] = {}
    db = open_database(settings.db_url)
    try:
        with broker.locked(paths), db.transaction() as session:
            existing = {d.id: d for d in find_devices(session, ids=[d for d, _ in plan])}
            for device_id, profile in plan:
                password = broker.new_password()
                digest = broker.hash_password(password)
                rabbit = rabbit_password_hash(password)
                device = existing.get(device_id)
                if device is None:
                    device = Device(
                        id=device_id, profile=profile, password_hash=digest, rabbitmq_password_hash=rabbit
                    )
                    device.tags = [DeviceTag(key=SIM_TAG[0], value=SIM_TAG[1])]
                    session.add(device)
                else:
                    device.profile, device.password_hash = profile, digest
                    device.rabbitmq_password_hash = rabbit
                out[device_id] = {"profile": profile, "password": password}
            session.flush()
            broker.write_broker_files(paths, password_hashes(session))
    finally:
        db.dispose()
    return out


def save_credentials(path: Path, credentials: dict[str, dict[str, str]], broker_url: str) -> None:
    """Write the simulated devices' passwords (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"broker_url": broker_url, "devices": credentials}
    broker.write_atomic(path, json.dumps(data, indent=1, sort_keys=True) + "\n", 0o600)


def load_credentials(path: Path) -> tuple[str | None, dict[str, dict[str, str]]]:
    """``(broker_url, {id: {profile, password}})`` from a credentials file; CliError naming the problem."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CliError(f"--credentials {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise CliError(f"--credentials {path}: not JSON ({e})") from None
    devices = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(devices, dict) or not devices:
        raise CliError(f'--credentials {path}: expected {{"devices": {{ID: {{profile, password}}}}}}')
    for device_id, entry in devices.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("password"), str):
            raise CliError(f"--credentials {path}: devices.{device_id}: needs a password string")
    url = data.get("broker_url")
    return (url if isinstance(url, str) else None), devices


def _devices(args: argparse.Namespace, settings: Settings) -> tuple[list[SimDevice], str | None, str]:
    from harness.simulate import SimDevice, assign_profiles, device_ids, parse_profile_mix

    if args.credentials:
        url, stored = load_credentials(Path(args.credentials))
        if len(stored) < args.devices:
            raise CliError(
                f"--credentials {args.credentials} has {len(stored)} devices; --devices asks for "
                f"{args.devices}"
            )
        chosen = sorted(stored)[: args.devices]
        devices = [
            SimDevice(d, stored[d].get("profile", "cpu"), username=d, password=stored[d]["password"])
            for d in chosen
        ]
        return devices, url, f"credentials from {args.credentials}"
    try:
        mix = parse_profile_mix(args.profile_mix)
    except ValueError as e:
        raise CliError(f"--profile-mix: {e}") from None
    ids = device_ids(args.devices, args.prefix)
    for device_id in ids[:1] + ids[-1:]:
        try:
            check_device_id(device_id)
        except InvalidInputError as e:
            raise CliError(f"--prefix {args.prefix!r}: {e}") from None
    profiles = assign_profiles(args.devices, mix, args.seed)
    if not args.provision:
        return [SimDevice(d, p) for d, p in zip(ids, profiles, strict=True)], None, "anonymous"
    with store_errors():
        try:
            credentials = provision(settings, list(zip(ids, profiles, strict=True)))
        except broker.BrokerError as e:
            raise CliError(str(e), EXIT_FAILURE) from e
    recorded = broker.load_settings(broker.BrokerPaths.of(settings.data_dir))
    url = recorded.url if recorded else None
    path = settings.data_dir / CREDENTIALS_FILE
    save_credentials(path, credentials, url or args.broker or "")
    try:
        note = reload_if_configured(broker.BrokerPaths.of(settings.data_dir))
    except broker.BrokerError as e:
        note = f"broker files updated, but the broker was not reloaded: {e}"
    print(f"provisioned {len(ids)} devices; passwords in {path}; {note}", file=sys.stderr)
    devices = [SimDevice(d, c["profile"], username=d, password=c["password"]) for d, c in credentials.items()]
    return devices, url, "provisioned"


def auto_processes(devices: int) -> int:
    """Worker processes when ``--processes`` is not given: one per core from ``AUTO_SPLIT`` devices on."""
    if devices < AUTO_SPLIT:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, devices // (AUTO_SPLIT // 2)))


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run the simulated fleet until ``--duration`` passes or it is interrupted."""
    if not 1 <= args.devices <= MAX_DEVICES:
        raise CliError(f"--devices {args.devices}: expected 1..{MAX_DEVICES}")
    if args.rate <= 0:
        raise CliError(f"--rate {args.rate:g}: expected a positive number of connections per second")
    if not 5 <= args.keepalive <= 65535:
        raise CliError(f"--keepalive {args.keepalive}: expected 5 to 65535 seconds")
    if args.duration is not None and args.duration <= 0:
        raise CliError(f"--duration {args.duration:g}: expected a positive number of seconds")
    if args.processes is None:
        args.processes = auto_processes(args.devices)
    if args.processes < 1:
        raise CliError(f"--processes {args.processes}: expected at least 1")
    if args.credentials and args.provision:
        raise CliError("give --credentials FILE or --provision, not both")
    from agent.runtime.simulated import SimulationSettings
    from harness.simulate import FleetOptions, SimulatedFleet, run_in_processes
    from modules.signing import KeyFormatError, load_public_key, load_public_key_file, public_key_pem

    settings = settings_from(args)
    try:
        sim = SimulationSettings(
            pull_s=_range(args.pull_s, "--pull-s"),
            ready_s=_range(args.ready_s, "--ready-s"),
            failure_rate=_probability(args.failure_rate, "--failure-rate"),
            crash_probability=_probability(args.crash_rate, "--crash-rate"),
            health_failure_probability=_probability(args.probe_failure_rate, "--probe-failure-rate"),
        )
    except ValueError as e:
        raise CliError(str(e)) from None
    try:
        key = (
            load_public_key_file(args.public_key)
            if args.public_key
            else load_public_key(public_key_bytes(settings.data_dir))
        )
    except (KeyFileError, KeyFormatError, OSError) as e:
        raise CliError(f"cloud public key: {e}", EXIT_FAILURE) from None
    devices, recorded_url, source = _devices(args, settings)
    url = args.broker or recorded_url or f"mqtt://{broker.DEFAULT_BIND}:{broker.DEFAULT_PORT}"
    try:
        check_broker_url(url)
    except InvalidInputError as e:
        raise CliError(f"--broker: {e}") from None
    options = FleetOptions(
        broker_url=url,
        protocol=args.protocol,
        subscribe_qos=args.subscribe_qos,
        connect_rate=args.rate,
        heartbeat_s=args.heartbeat,
        keepalive_s=args.keepalive,
        settings=sim,
        seed=args.seed,
        inline_file_io=True,
        tune_gc=True,
    )
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()), format="%(levelname)s %(name)s: %(message)s"
    )
    print(
        f"simulating {len(devices)} devices ({source}) on {url}, {args.rate:g} connections/s, "
        f"failure rate {sim.failure_rate:g}",
        file=sys.stderr,
    )
    progress = None if args.quiet else _progress
    if args.processes > 1:
        final, errors = run_in_processes(
            devices, public_key_pem(key), options, args.processes, args.duration, progress, args.progress
        )
    else:
        fleet = SimulatedFleet(devices, key, options)
        final = _run(fleet, args.duration, progress, args.progress)
        errors = fleet.errors()
    if args.json:
        print_json({**final.as_dict(), "broker_url": url, "errors": errors})
    else:
        print(f"final: {final.line()}")
        for device_id, error in list(errors.items())[:10]:
            print(f"  {device_id}: {error}")
    return EXIT_FAILURE if errors else 0


def _progress(snapshot: Snapshot) -> None:
    print(snapshot.line(), file=sys.stderr, flush=True)


def _run(fleet: Any, duration: float | None, progress: Any, every: float) -> Snapshot:
    async def main() -> Snapshot:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, fleet.stop)
        result: Snapshot = await fleet.run(duration, progress, every)
        return result

    from harness.simulate import event_loop_runner

    result: Snapshot = event_loop_runner()(main())
    return result


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``simulate`` command."""
    p = add_command(
        subparsers,
        "simulate",
        cmd_simulate,
        help="run N simulated devices (real agents, simulated modules) against a broker",
        description="Run N agents in this process, each with its own MQTT connection and credentials, "
        "the real admission, planner, state, rollout and rollback code, and a simulated runtime whose "
        "modules pull, start, become healthy, crash or fail health checks with the given probabilities. "
        "Prints progress on stderr and a summary at the end (Ctrl-C ends it cleanly).",
        examples="  edgectl simulate --devices 1000 --profile-mix cpu=80,cuda=15,openvino-myriad=5\n"
        "  edgectl simulate --devices 50 --provision --failure-rate 0.02 --duration 120 --json\n"
        "  edgectl simulate --devices 200 --broker mqtt://127.0.0.1:1883 --rate 200 --duration 60",
    )
    p.add_argument("--devices", type=int, required=True, metavar="N", help="how many devices to simulate")
    p.add_argument(
        "--profile-mix",
        default="cpu=100",
        metavar="P=W,...",
        help="device profiles by weight (default cpu=100), e.g. cpu=80,cuda=15,openvino-myriad=5",
    )
    p.add_argument(
        "--failure-rate", default="0", metavar="P", help="chance that a module configuration is broken"
    )
    p.add_argument(
        "--crash-rate", default="0", metavar="P", help="chance that a module start ends in a crash"
    )
    p.add_argument(
        "--probe-failure-rate", default="0", metavar="P", help="chance that one liveness probe fails"
    )
    p.add_argument(
        "--pull-s", default="0.2-1.5", metavar="LOW-HIGH", help="pull time in seconds (default 0.2-1.5)"
    )
    p.add_argument(
        "--ready-s", default="0.3-2", metavar="LOW-HIGH", help="start to ready in seconds (default 0.3-2)"
    )
    p.add_argument(
        "--broker", metavar="URL", help="broker URL (default: from broker config, else mqtt://127.0.0.1:1883)"
    )
    p.add_argument("--protocol", choices=("mqttv5", "mqttv311"), default="mqttv5")
    p.add_argument(
        "--subscribe-qos",
        type=int,
        choices=(0, 1),
        default=1,
        help="QoS of the agents' subscriptions (0 on a RabbitMQ 3.10 cluster: see docs/brokers.md)",
    )
    source = p.add_mutually_exclusive_group()
    source.add_argument("--credentials", metavar="FILE", help="device passwords from an earlier --provision")
    source.add_argument(
        "--provision",
        action="store_true",
        help="register sim-NNNNN devices in the cloud and use their credentials",
    )
    p.add_argument("--prefix", default="sim-", help="device id prefix (default sim-)")
    p.add_argument(
        "--rate", type=float, default=500.0, metavar="N", help="new connections per second (default 500)"
    )
    p.add_argument(
        "--keepalive",
        type=int,
        default=60,
        metavar="S",
        help="MQTT keep-alive of the agents (default 60; a real agent's is 135): a connection whose "
        "CONNACK or ping answer takes longer is dropped and retried",
    )
    p.add_argument(
        "--processes",
        type=int,
        metavar="N",
        help="split the devices over N worker processes, one per core (default: 1 below "
        f"{AUTO_SPLIT:,} devices, else one per core)",
    )
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: until Ctrl-C)")
    p.add_argument(
        "--heartbeat", type=float, default=60.0, metavar="S", help="report heartbeat (default 60, ±10%%)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed of the simulation (default 0)")
    p.add_argument("--public-key", metavar="FILE", help="cloud public key (default: the data directory's)")
    p.add_argument("--progress", type=float, default=2.0, metavar="S", help="progress line every S seconds")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="agent log level",
    )
