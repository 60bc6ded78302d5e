"""``edgectl broker``: write a Mosquitto configuration, rewrite its password/ACL files, reload it."""

from __future__ import annotations

import argparse
import ipaddress
import os
import pwd
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cloud import broker, broker_rabbitmq
from cloud.commands.base import EXIT_FAILURE, CliError, add_command, print_json, settings_from, store_errors
from cloud.devices import DeviceManager, check_broker_url
from cloud.store.db import open_database
from cloud.store.devices import rabbitmq_password_hashes


@contextmanager
def _broker_errors() -> Iterator[None]:
    try:
        yield
    except broker.BrokerError as e:
        raise CliError(str(e), EXIT_FAILURE) from e


def _sync(args: argparse.Namespace) -> broker.BrokerPaths:
    with store_errors(), _broker_errors():
        manager = DeviceManager.open(settings_from(args))
        try:
            return manager.sync_broker_files()
        finally:
            manager.close()


def _existing_file(value: str | None, option: str) -> Path | None:
    if value is None:
        return None
    path = Path(value).expanduser().absolute()
    if not path.is_file():
        raise CliError(f"{option} {value}: no such file")
    return path


def _listener(args: argparse.Namespace) -> broker.ListenerOptions:
    cert = _existing_file(args.tls_cert, "--tls-cert")
    key = _existing_file(args.tls_key, "--tls-key")
    ca = _existing_file(args.ca, "--ca")
    if (cert is None) != (key is None):
        raise CliError("--tls-cert and --tls-key go together: give both or neither")
    if ca is not None and cert is None:
        raise CliError("--ca needs TLS: give --tls-cert and --tls-key too")
    try:
        ipaddress.ip_address(args.bind)
    except ValueError:
        raise CliError(f"--bind {args.bind!r}: not an IP address") from None
    port = args.port if args.port is not None else (broker.DEFAULT_TLS_PORT if cert else broker.DEFAULT_PORT)
    if not 1 <= port <= 65535:
        raise CliError(f"--port {port}: must be between 1 and 65535")
    return broker.ListenerOptions(port=port, bind=args.bind, tls_cert=cert, tls_key=key, ca_file=ca)


def _run_as(user: str | None) -> str:
    """Who Mosquitto runs as: ``--user``, else whoever runs this (root stays root)."""
    if user is not None:
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise CliError(f"--user {user!r}: no such user on this machine") from None
        return user
    return pwd.getpwuid(os.geteuid()).pw_name


def _give_to(user: str, *paths: Path) -> None:
    """Let ``user`` write ``paths`` (when root starts Mosquitto it drops to that user first)."""
    if os.geteuid() != 0:
        return
    entry = pwd.getpwnam(user)
    for path in paths:
        try:
            os.chown(path, entry.pw_uid, entry.pw_gid)
        except OSError as e:
            raise broker.BrokerError(f"cannot give {path} to {user}: {e.strerror or e}") from None


def cmd_config(args: argparse.Namespace) -> int:
    """Write DIR/mosquitto.conf using the generated password and ACL files."""
    listener = _listener(args)
    url = args.url or broker.listener_url(listener)
    cloud_port = args.cloud_port if args.cloud_port is not None else listener.port + 1
    if not 1 <= cloud_port <= 65535 or cloud_port == listener.port:
        raise CliError(f"--cloud-port {cloud_port}: give a port between 1 and 65535 other than --port")
    cloud_url = f"mqtt://127.0.0.1:{cloud_port}"
    run_as = _run_as(args.user)
    with store_errors():
        check_broker_url(url)
    out = Path(args.out).expanduser().absolute()
    paths = _sync(args)
    conf_file = out / "mosquitto.conf"
    pid_file = out / "mosquitto.pid"
    with _broker_errors():
        try:
            (out / "data").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise broker.BrokerError(f"cannot create {out / 'data'}: {e.strerror or e}") from None
        _give_to(run_as, out, out / "data")
        text = broker.render_mosquitto_conf(
            listener,
            cloud_port=cloud_port,
            password_file=paths.password_file.absolute(),
            acl_file=paths.acl_file.absolute(),
            persistence_dir=out / "data",
            pid_file=pid_file,
            user=run_as,
        )
        broker.write_atomic(conf_file, text, 0o644)
        settings = broker.BrokerSettings(
            url=url, cloud_url=cloud_url, ca_file=listener.ca_file, pid_file=pid_file, config_file=conf_file
        )
        broker.save_settings(paths, settings)
    if args.json:
        print_json(
            {
                "config_file": str(conf_file),
                "password_file": str(paths.password_file),
                "acl_file": str(paths.acl_file),
                "pid_file": str(pid_file),
                "url": url,
                "cloud_url": cloud_url,
                "user": run_as,
            }
        )
    else:
        print(f"wrote {conf_file}")
        print(f"password file {paths.password_file}, ACL file {paths.acl_file}")
        print(f"devices will connect to {url} (client id = device id); the cloud to {cloud_url}")
        print(f"run the broker: mosquitto -c {conf_file}   (as root it runs as {run_as})")
    return 0


def cmd_reload(args: argparse.Namespace) -> int:
    """Send SIGHUP to the broker so it rereads the password and ACL files."""
    with _broker_errors():
        if args.pid_file:
            pid_file = Path(args.pid_file)
        else:
            recorded = broker.load_settings(broker.BrokerPaths.of(settings_from(args).data_dir))
            if recorded is None or recorded.pid_file is None:
                raise CliError(
                    "no pid file recorded: give --pid-file FILE (or run edgectl broker config first)"
                )
            pid_file = recorded.pid_file
        pid = broker.reload_broker(pid_file)
    if args.json:
        print_json({"pid": pid, "pid_file": str(pid_file)})
    else:
        print(f"sent SIGHUP to mosquitto (pid {pid}): password and ACL files reloaded")
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Rewrite the password and ACL files from the device table."""
    paths = _sync(args)
    if args.json:
        print_json({"password_file": str(paths.password_file), "acl_file": str(paths.acl_file)})
    else:
        print(f"rewrote {paths.password_file} and {paths.acl_file}")
        print("reload the broker to apply them: edgectl broker reload", file=sys.stderr)
    return 0


def cmd_rabbitmq(args: argparse.Namespace) -> int:
    """Write the RabbitMQ definitions file (users, permissions, topic permissions) from the device table."""
    settings = settings_from(args)
    paths = broker.BrokerPaths.of(settings.data_dir)
    with store_errors(), _broker_errors():
        db = open_database(settings.db_url)
        try:
            with db.transaction() as s:
                hashes = rabbitmq_password_hashes(s)
        finally:
            db.dispose()
        out = Path(args.out).expanduser().absolute() if args.out else None
        target, left_out = broker_rabbitmq.write_definitions(paths, hashes, out)
    if args.json:
        print_json(
            {"definitions_file": str(target), "devices": len(hashes) - len(left_out), "left_out": left_out}
        )
    else:
        print(f"wrote {target}: {len(hashes) - len(left_out)} device(s) and the cloud's user")
        print(f"import it on any node of the cluster: rabbitmqctl import_definitions {target}")
        print("each node's rabbitmq.conf should hold (see docs/brokers.md):")
        for line in broker_rabbitmq.NODE_SETTINGS:
            print(f"  {line}")
        for device, why in left_out.items():
            print(f"left out {device}: {why}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``broker`` group."""
    group = subparsers.add_parser(
        "broker",
        help="Mosquitto configuration, password and ACL files",
        description="Generate what a stock Mosquitto (2.x) needs to serve the fleet: a configuration with "
        "no anonymous access, the password file (PBKDF2-SHA512, mosquitto_passwd's format) and the ACL "
        "file (each device reaches only its own topics). Files live in <data dir>/broker/; Mosquitto "
        "rereads them on SIGHUP (edgectl broker reload). When mosquitto runs as another user (--user), "
        "that user must be able to read <data dir>/broker/ (the files are group-readable).",
    )
    commands = group.add_subparsers(dest="broker_command", metavar="COMMAND", required=True)

    p = add_command(
        commands,
        "config",
        cmd_config,
        help="write a mosquitto.conf that uses the generated files",
        description="Write DIR/mosquitto.conf: a device listener (loopback by default, TLS when given a "
        "certificate) where the client id is the device's username, so no device can knock another off, "
        "a loopback listener for the cloud's workers (--cloud-port), allow_anonymous false, the password and "
        "ACL files, persistence in DIR/data and a "
        "pid file DIR/mosquitto.pid that device add/remove and broker reload use to signal the broker.",
        examples="  edgectl broker config --out /etc/edgedeploy/mosquitto\n"
        "  edgectl broker config --out ./broker --port 1884 --user mosquitto\n"
        "  edgectl broker config --out ./broker --bind 0.0.0.0 --url mqtts://broker.example.com:8883 \\\n"
        "      --tls-cert server.pem --tls-key server.key --ca ca.pem",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="folder for mosquitto.conf, data and pid file")
    p.add_argument("--port", type=int, help="listener port (default 1883, 8883 with TLS)")
    p.add_argument("--bind", default=broker.DEFAULT_BIND, help="listener address (default 127.0.0.1)")
    p.add_argument("--url", help="URL devices use to reach the broker (default from --bind and --port)")
    p.add_argument("--tls-cert", metavar="FILE", help="server certificate (PEM): serve TLS")
    p.add_argument("--tls-key", metavar="FILE", help="server private key (PEM)")
    p.add_argument("--ca", metavar="FILE", help="CA bundle; copied into each new device's configuration")
    p.add_argument(
        "--user",
        help="user mosquitto runs as when started as root (default: whoever runs this command; "
        "DIR and DIR/data are given to that user)",
    )
    p.add_argument(
        "--cloud-port",
        type=int,
        help="loopback port of the cloud's own listener (default: the device port + 1)",
    )

    p = add_command(
        commands,
        "reload",
        cmd_reload,
        help="make the broker reread its password and ACL files (SIGHUP)",
        description="Send SIGHUP to the broker whose pid is in the pid file (default: the one broker "
        "config recorded). Mosquitto then rereads its password and ACL files.",
        examples="  edgectl broker reload\n  edgectl broker reload --pid-file /run/mosquitto/mosquitto.pid",
    )
    p.add_argument("--pid-file", metavar="FILE", help="the broker's pid file")

    add_command(
        commands,
        "sync",
        cmd_sync,
        help="rewrite the password and ACL files from the device table",
        description="Rewrite <data dir>/broker/passwd and acl from the database (after a restore, or when "
        "a file was lost), creating the cloud's MQTT user on first use.",
        examples="  edgectl broker sync && edgectl broker reload",
    )

    p = add_command(
        commands,
        "rabbitmq",
        cmd_rabbitmq,
        help="write RabbitMQ users and topic permissions (definitions file) from the device table",
        description="Write a RabbitMQ definitions file for a cluster running the MQTT plugin: one user per "
        "device (RabbitMQ's salted SHA-256 hash of its password) that may write only its own reported, "
        "online and cmd/res topics and read only its own desired, cmd/req and online topics (topic "
        "authorisation on amq.topic, the same rules as the Mosquitto ACL), and the cloud's user. "
        "Import it with rabbitmqctl import_definitions FILE.",
        examples="  edgectl broker rabbitmq && rabbitmqctl import_definitions ~/.edgedeploy/broker/"
        "rabbitmq-definitions.json\n  edgectl broker rabbitmq --out /tmp/defs.json --json",
    )
    p.add_argument(
        "--out",
        metavar="FILE",
        help=f"where to write it (default <data dir>/broker/{broker_rabbitmq.DEFINITIONS_FILE})",
    )
