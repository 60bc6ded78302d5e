"""``edgectl deploy``: apply, list, show, delete deployments; rollout status; publish; watch.

Which model versions a deployment uses is recorded from ``--model NAME:VERSION`` on ``apply``
(repeatable) and by ``set-model``; a version in use cannot be deleted from the registry. Without
``--model`` an existing association is kept.

``set-model NAME MODULE MODEL[:VERSION]`` packages the model version (through
``cloud.packaging.package``) into one image per profile the module lists, pushes them, and applies
the deployment with the new images: the rollout waves of the manifest apply. ``--follow`` keeps
doing so for every version of the model registered later (``cloud/continuous.py``); a pinned
``set-model`` or ``unfollow`` ends that.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cloud import broker
from cloud.broker import resolve_endpoint
from cloud.commands.base import (
    EXIT_FAILURE,
    EXIT_USAGE,
    CliError,
    add_command,
    format_table,
    print_json,
    settings_from,
    store_errors,
)
from cloud.commands.views import module_lines
from cloud.fleet.controller import INTERVAL_S, RECOMPUTE_EVERY_S, Controller
from cloud.fleet.device_state import device_states
from cloud.fleet.manifest_diff import manifest_diff, replaced_pins
from cloud.fleet.service import ApplyResult, Fleet, PublishReport, parse_model_refs
from cloud.fleet.targeting import some_ids
from cloud.keys import KeyFileError
from cloud.store.errors import NotFoundError
from edgemqtt.endpoint import Endpoint
from modules.contract import DeploymentManifest, ModuleStatus, utcnow
from modules.documents import DocumentError, load_model_file


@contextmanager
def open_fleet(args: argparse.Namespace) -> Iterator[Fleet]:
    """The fleet service of the selected data directory; store and key errors become CliErrors."""
    with store_errors():
        try:
            fleet = Fleet.open(settings_from(args))
        except KeyFileError as e:
            raise CliError(str(e), EXIT_FAILURE) from e
        except DocumentError as e:
            raise CliError(f"device profiles: {e}", EXIT_FAILURE) from e
        try:
            yield fleet
        finally:
            fleet.close()


def endpoint_from(args: argparse.Namespace) -> Endpoint:
    """The broker endpoint from ``--broker-url``, the environment or the data directory."""
    try:
        return resolve_endpoint(settings_from(args).data_dir, getattr(args, "broker_url", None))
    except ValueError as e:
        raise CliError(str(e)) from e
    except broker.BrokerError as e:
        raise CliError(str(e), EXIT_FAILURE) from e


def add_broker_option(parser: argparse.ArgumentParser) -> None:
    """``--broker-url``."""
    parser.add_argument(
        "--broker-url",
        metavar="URL[,URL...]",
        help="mqtt://host:port or mqtts://host:port, or the comma-separated nodes of a cluster "
        "(default: $EDGE_BROKER_URL, the URL saved by 'edgectl broker config', else mqtt://127.0.0.1:1883)",
    )


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return value


def tell_publish(report: PublishReport) -> None:
    if report.error:
        print(
            f"warning: {report.error}\nwarning: {report.pending} desired state(s) are stored and pending; "
            "they go out with 'edgectl deploy publish' or 'edgectl deploy watch' once the broker is back",
            file=sys.stderr,
        )


def _counts(new_generations: int, report: PublishReport) -> str:
    return f"{new_generations} new desired state(s), {report.published} published, {report.pending} pending"


def _waves(result: ApplyResult) -> str:
    return ", ".join(str(n) for n in result.waves) or "none"


def cmd_apply(args: argparse.Namespace) -> int:
    """Apply a deployment manifest."""
    from cloud.continuous import follows

    path = Path(args.file)
    try:
        manifest = load_model_file(DeploymentManifest, path)
    except DocumentError as e:
        raise CliError(str(e)) from e
    with store_errors():
        models = parse_model_refs(args.model) if args.model else None
    endpoint = endpoint_from(args)
    with open_fleet(args) as fleet, store_errors():
        try:
            stored, recorded = fleet.manifest(manifest.name)
        except NotFoundError:
            stored, recorded = None, []
        diff = manifest_diff(stored, manifest, str(path))
        following = {f.module: f.model for f in follows(fleet.db, deployment=manifest.name)}
        for line in replaced_pins(stored, manifest, recorded, following):
            print(line, file=sys.stderr)
        result = fleet.apply(
            manifest,
            models=models,
            endpoint=None if args.dry_run else endpoint,
            source=str(path),
            dry_run=args.dry_run,
        )
    if args.json:
        print_json({**_jsonable(result), "dry_run": args.dry_run, "diff": diff})
        tell_publish(result.publish)
        return 0
    if diff:
        print("\n".join(diff))
    verb = "created" if result.created else "updated" if result.manifest_changed else "unchanged"
    if args.dry_run:
        print(
            f"dry run: deployment {result.deployment} would be {verb}: {result.selected} device(s) selected, "
            f"{result.winning} would run it (waves: {_waves(result)}); {result.new_generations} new desired "
            "state(s); nothing was stored or published"
        )
        _print_placements(result)
        return 0
    print(
        f"deployment {result.deployment} {verb}: {result.selected} device(s) selected, {result.winning} "
        f"run it (waves: {_waves(result)}); {_counts(result.new_generations, result.publish)}"
    )
    _print_placements(result)
    tell_publish(result.publish)
    return 0


def _print_placements(result: ApplyResult) -> None:
    """Which devices get which module from which deployment (layers change and add modules)."""
    for p in result.placements:
        print(f"  {p.module} {p.origin} on {len(p.devices)} device(s): {some_ids(p.devices)}")


def cmd_list(args: argparse.Namespace) -> int:
    """List deployments."""
    with open_fleet(args) as fleet, store_errors():
        rows = fleet.list_deployments()
    if args.json:
        print_json(_jsonable(rows))
        return 0
    if not rows:
        print("no deployments", file=sys.stderr)
        return 0
    print(
        format_table(
            ("NAME", "PRIORITY", "MODULES", "TARGET", "ROLLOUT", "DEVICES", "HEALTHY", "MODELS"),
            [
                (
                    r.name,
                    f"{r.priority} (layer)" if r.layered else r.priority,
                    ",".join(r.modules),
                    _target(r.target),
                    r.rollout_state,
                    r.devices,
                    r.healthy,
                    ",".join(r.models) or "-",
                )
                for r in rows
            ],
        )
    )
    return 0


def _target(target: dict[str, Any]) -> str:
    parts = []
    if target.get("device_ids"):
        parts.append("ids=" + ",".join(target["device_ids"]))
    parts += [f"{k}={v}" for k, v in target.get("tags", {}).items()]
    if target.get("profile"):
        parts.append(f"profile={target['profile']}")
    return " ".join(parts)


def cmd_show(args: argparse.Namespace) -> int:
    """Show a deployment's manifest, the model versions it uses and what its modules follow."""
    from cloud.continuous import deployment_document

    with open_fleet(args) as fleet, store_errors():
        doc = deployment_document(fleet, args.name)
    if args.json:
        print_json(doc.model_dump(mode="json"))
    else:
        print_json(doc.manifest.model_dump(mode="json"))
        print(f"models: {', '.join(doc.models) or '-'}")
        for module, model in sorted(doc.follows.items()):
            unfollow = f"edgectl deploy unfollow {args.name} {module}"
            print(f"module {module} follows {model}:latest ({unfollow} to pin)")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete a deployment; its devices fall back to the next deployment or to running nothing."""
    endpoint = endpoint_from(args)
    with open_fleet(args) as fleet, store_errors():
        changed, report = fleet.delete(args.name, endpoint=endpoint)
    if args.json:
        print_json({"deployment": args.name, "new_generations": changed, "publish": _jsonable(report)})
    else:
        print(f"deleted deployment {args.name}: {_counts(changed, report)}")
    tell_publish(report)
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Why a device runs what it runs."""
    with open_fleet(args) as fleet, store_errors():
        why = fleet.explain(args.device)
    if args.json:
        print_json(_jsonable(why))
        return 0
    print(f"device {why.device} (profile {why.profile}; images tried in order: {' → '.join(why.chain)})")
    if why.candidates:
        print("deployments that select it:")
        for c in why.candidates:
            when = f"{c.applied_at:%Y-%m-%d %H:%M:%SZ}"
            print(f"  {c.deployment}  priority {c.priority}, applied {when}: {c.outcome}")
    if why.problem:
        print(f"runs nothing: {why.problem}")
        return 0
    print("modules:")
    for m in why.modules:
        print(f"  {m.module}  {m.origin}: {m.image} (profile {m.profile}, {m.note})")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """The revisions of a deployment."""
    with open_fleet(args) as fleet, store_errors():
        revisions = fleet.history(args.name)
    if args.json:
        print_json(_jsonable(revisions))
        return 0
    rows = [
        (
            f"{r.number}{' *' if r.current else ''}",
            r.applied_at.strftime("%Y-%m-%d %H:%M:%SZ"),
            " ".join(f"{m}={','.join(sorted(set(i.values())))}" for m, i in sorted(r.images.items())),
            ",".join(r.models) or "-",
            r.source,
        )
        for r in revisions
    ]
    print(format_table(("REV", "APPLIED", "IMAGES", "MODELS", "SOURCE"), rows))
    print("(* applied now)", file=sys.stderr)
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    """Apply an earlier revision again."""
    endpoint = endpoint_from(args)
    with open_fleet(args) as fleet, store_errors():
        current = fleet.manifest(args.name)[0]
        number, target = fleet.revision(args.name, args.to)
        result = fleet.apply(
            target,
            endpoint=None if args.dry_run else endpoint,
            source=f"rollback to revision {number}",
            dry_run=args.dry_run,
        )
    diff = manifest_diff(current, target, f"revision {number}")
    if args.json:
        print_json({**_jsonable(result), "rolled_back_to": number, "dry_run": args.dry_run, "diff": diff})
        tell_publish(result.publish)
        return 0
    if diff:
        print("\n".join(diff))
    if args.dry_run:
        print(
            f"dry run: rolling {args.name} back to revision {number} would issue {result.new_generations} "
            "new desired state(s); nothing was stored or published"
        )
        return 0
    now = f"revision {result.revision}" if result.revision is not None else "unchanged: it is what runs"
    print(
        f"deployment {args.name} rolled back to revision {number} ({now}): "
        f"{_counts(result.new_generations, result.publish)}"
    )
    tell_publish(result.publish)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """Resume a halted rollout (``retry``: and try the failed devices again)."""
    endpoint = endpoint_from(args)
    retry = args.deploy_command == "retry"
    with open_fleet(args) as fleet, store_errors():
        what, new, report = fleet.resume(args.name, retry=retry, endpoint=endpoint)
    if args.json:
        print_json(
            {"deployment": args.name, "result": what, "new_generations": new, "publish": _jsonable(report)}
        )
    else:
        print(f"deployment {args.name}: {what}; {_counts(new, report)}")
    tell_publish(report)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Per-wave and per-device progress of a deployment."""
    with open_fleet(args) as fleet, store_errors():
        progress = fleet.progress(args.name)
        failing = [d.device for d in progress.devices if d.status in EXPLAINED]
        with fleet.db.transaction() as s:
            states = device_states(s, failing, utcnow())
    why = {d: {n: m for n, m in st.modules.items() if not _fine(m)} or st.modules for d, st in states.items()}
    if args.json:
        detail = {d: {n: m.model_dump(mode="json") for n, m in ms.items()} for d, ms in why.items()}
        print_json(_jsonable(progress) | {"failing_modules": detail})
        return 0
    print(f"deployment {progress.name}: rollout {progress.rollout_state}; {progress.rollout_message}")
    print()
    print(
        format_table(
            ("WAVE", "DEVICES", "STARTED", "STATUS"),
            [
                (
                    w.index + 1,
                    w.devices,
                    "yes" if w.started else "no",
                    " ".join(f"{k}={v}" for k, v in sorted(w.counts.items())) or "-",
                )
                for w in progress.waves
            ],
        )
    )
    print()
    print(
        format_table(
            ("DEVICE", "WAVE", "GENERATION", "STATUS", "DETAIL"),
            [
                (
                    d.device,
                    "-" if d.wave is None else d.wave + 1,
                    "-" if d.generation is None else d.generation,
                    d.status,
                    d.detail or "-",
                )
                for d in progress.devices
            ],
        )
    )
    for device, modules in why.items():
        print()
        st = states[device]
        print(f"{device}: {st.deployment_status or 'no report'}" + (f": {st.reason}" if st.reason else ""))
        print("\n".join(module_lines(modules)) if modules else "  (no module reported)")
    return 0


EXPLAINED = frozenset({"failed", "rolled back", "rejected"})
"""Device statuses that ``deploy status`` explains with the device's module detail."""


def _fine(m: ModuleStatus) -> bool:
    return m.runtime_status == "running" and m.health is not None and m.health.ready


def cmd_publish(args: argparse.Namespace) -> int:
    """Recompute desired states, then publish what the broker has not acknowledged yet."""
    endpoint = endpoint_from(args)
    with open_fleet(args) as fleet, store_errors():
        new = fleet.recompute()
        report = fleet.publish_pending(endpoint)
    if args.json:
        print_json({"new_generations": new, **_jsonable(report)})
    else:
        recomputed = f"{new} new desired state(s); " if new else ""
        print(f"{recomputed}{report.published} desired state(s) published, {report.pending} pending")
    if report.error:
        print(f"edgectl: error: {report.error}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def cmd_set_model(args: argparse.Namespace) -> int:
    """Package a model version into a deployment's module and roll the new images out."""
    from cloud.continuous import Follow, end_follow, roll_out_model, set_follow
    from cloud.packaging.progress import LinePrinter
    from cloud.store import Registry
    from cloud.store.refs import parse_model_ref

    model_name, version = parse_model_ref(args.model)
    if args.follow and version is not None:
        raise CliError(f"--follow follows the newest version: give {model_name} or {model_name}:latest")
    config = str(Path(args.config).resolve()) if args.config else None
    follow = Follow(
        args.name, args.module, model_name, config, args.registry, args.repository, not args.no_smoke
    )
    endpoint = endpoint_from(args)
    with open_fleet(args) as fleet, store_errors(), rollout_errors():
        registry = Registry.open(settings_from(args))
        try:
            done = roll_out_model(
                fleet, registry, follow, args.model, endpoint=endpoint, progress=LinePrinter(sys.stderr)
            )
        finally:
            registry.close()
        if args.follow:
            set_follow(fleet.db, follow)
            ended = None
        else:
            ended = end_follow(fleet.db, args.name, args.module)
    result = done.apply
    if args.json:
        print_json({"images": done.images, "apply": _jsonable(result), "follows": args.follow})
    else:
        for profile, image in sorted(done.images.items()):
            print(f"{args.module} ({profile}): {image}")
        print(
            f"deployment {result.deployment} now uses {done.model}: "
            f"{_counts(result.new_generations, result.publish)} (waves: {_waves(result)})"
        )
        if args.follow:
            print(f"{args.name}/{args.module} follows {model_name}: each new version registered rolls out")
        elif ended is not None:
            print(f"{args.name}/{args.module} no longer follows {ended.model} (pinned to {done.model})")
    tell_publish(result.publish)
    return 0


def cmd_unfollow(args: argparse.Namespace) -> int:
    """Stop a module following a model's newest version; it keeps what it runs."""
    from cloud.continuous import end_follow

    with open_fleet(args) as fleet, store_errors():
        fleet.manifest(args.name)
        ended = end_follow(fleet.db, args.name, args.module)
    if args.json:
        print_json(
            {"deployment": args.name, "module": args.module, "followed": ended.model if ended else None}
        )
    elif ended is None:
        print(f"{args.name}/{args.module} follows no model", file=sys.stderr)
    else:
        print(f"{args.name}/{args.module} no longer follows {ended.model}; it keeps the images it has")
    return 0


@contextmanager
def rollout_errors() -> Iterator[None]:
    """Packaging failures of a model rollout as one-line CliErrors (with the module's log tail)."""
    from cloud.commands.package import print_log_tail
    from cloud.continuous import RolloutError

    try:
        yield
    except RolloutError as e:
        print_log_tail(e.log_tail)
        raise CliError(str(e), EXIT_USAGE if e.usage else EXIT_FAILURE) from e


def reports_queue_from(text: str | None, endpoint: Endpoint) -> list[str]:
    """The ``--reports-queue`` URLs; those without credentials get the cloud's MQTT user's."""
    urls = []
    for url in (u.strip() for u in (text or "").split(",") if u.strip()):
        scheme, sep, rest = url.partition("://")
        if scheme not in ("amqp", "amqps") or not sep or not rest:
            raise CliError(f"--reports-queue {url!r}: expected amqp://host:port/ or amqps://host:port/")
        if "@" not in rest.split("/", 1)[0] and endpoint.username is not None:
            user = quote(endpoint.username, safe="")
            secret = f":{quote(endpoint.password, safe='')}" if endpoint.password is not None else ""
            url = f"{scheme}://{user}{secret}@{rest}"
        urls.append(url)
    return urls


def cmd_watch(args: argparse.Namespace) -> int:
    """Run the rollout controller: ingest reports, advance waves, publish what is pending."""
    endpoint = endpoint_from(args)
    with open_fleet(args) as fleet, store_errors():
        controller = Controller(
            fleet,
            endpoint,
            interval_s=args.interval,
            say=lambda line: print(line, flush=True),
            warn=lambda line: print(f"warning: {line}", file=sys.stderr, flush=True),
            reports_queue=reports_queue_from(args.reports_queue, endpoint),
        )
        asyncio.run(controller.run(until_settled=args.until_settled))
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``deploy`` group."""
    group = subparsers.add_parser(
        "deploy",
        help="deploy modules to devices and follow rollouts",
        description="Declare which modules run on which devices. Each affected device gets a signed desired "
        "state, published retained over MQTT; rollouts advance wave by wave as devices report.",
    )
    commands = group.add_subparsers(dest="deploy_command", metavar="COMMAND", required=True)

    p = add_command(
        commands,
        "apply",
        cmd_apply,
        help="apply a deployment manifest",
        description="Check and store a DeploymentManifest (YAML or JSON), compute and sign each affected "
        "device's desired state and publish it; first it prints what changes against the stored manifest "
        "(a unified diff, defaults spelt out). Unchanged devices get nothing. When the broker is down the "
        "states are stored and published later by 'deploy publish' or 'deploy watch'.",
        examples="  edgectl deploy apply -f vision.yaml --dry-run\n"
        "  edgectl deploy apply -f vision.yaml\n"
        "  edgectl deploy apply -f vision.yaml --model digits:3 --json",
    )
    p.add_argument("-f", "--file", required=True, metavar="FILE", help="the manifest (YAML or JSON)")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="check and show what would change (a diff from the stored manifest, devices, waves) without "
        "storing or publishing anything",
    )
    p.add_argument(
        "--model",
        action="append",
        metavar="NAME:VERSION",
        help="record that the deployment uses this registered model version (repeatable)",
    )
    add_broker_option(p)

    add_command(
        commands,
        "list",
        cmd_list,
        help="list deployments",
        description="List deployments with their targets, rollout state and device counts.",
        examples="  edgectl deploy list\n  edgectl deploy list --json",
    )

    p = add_command(
        commands,
        "show",
        cmd_show,
        help="show a deployment's manifest",
        description="Print a deployment's stored manifest and the model versions it uses.",
        examples="  edgectl deploy show vision",
    )
    p.add_argument("name", metavar="NAME")

    p = add_command(
        commands,
        "delete",
        cmd_delete,
        help="delete a deployment",
        description="Delete a deployment. Its devices get the next deployment that selects them, or an empty "
        "desired state (their modules are stopped and removed).",
        examples="  edgectl deploy delete vision",
    )
    p.add_argument("name", metavar="NAME")
    add_broker_option(p)

    p = add_command(
        commands,
        "explain",
        cmd_explain,
        help="why a device runs what it runs",
        description="Show the deployments that select a device in the order they compete (priority, then "
        "the later apply), which one wins, and for each module it gives the device the image and the "
        "device profile it was chosen for (the device's own or a fallback).",
        examples="  edgectl deploy explain cam-1\n  edgectl deploy explain cam-1 --json",
    )
    p.add_argument("device", metavar="DEVICE")

    p = add_command(
        commands,
        "history",
        cmd_history,
        help="the revisions of a deployment",
        description="List every revision of a deployment: each apply that changed its manifest (files, "
        "set-model, rollbacks), with when, the images and models it named, and where it came from.",
        examples="  edgectl deploy history vision\n  edgectl deploy history vision --json",
    )
    p.add_argument("name", metavar="NAME")

    p = add_command(
        commands,
        "rollback",
        cmd_rollback,
        help="apply an earlier revision again",
        description="Apply an earlier revision of a deployment again (default: the one before the current), "
        "as a new revision that rolls out in its waves like any apply. Prints the diff first.",
        examples="  edgectl deploy rollback vision\n  edgectl deploy rollback vision --to 3 --dry-run",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("--to", type=int, metavar="REV", help="the revision to go back to (see deploy history)")
    p.add_argument("--dry-run", action="store_true", help="show what would change, store and publish nothing")
    add_broker_option(p)

    for verb, help_text, description in (
        (
            "resume",
            "resume a halted rollout",
            "Set a halted (or reverted) rollout rolling again from its current wave, with a new health "
            "deadline; a reverted wave gets the deployment's content again.",
        ),
        (
            "retry",
            "resume and give failed devices a new generation",
            "Resume the rollout and give every device of the deployment that failed, rolled back or "
            "rejected it a new generation of the same content, so its agent tries again.",
        ),
    ):
        p = add_command(
            commands,
            verb,
            cmd_resume,
            help=help_text,
            description=description,
            examples=f"  edgectl deploy {verb} vision",
        )
        p.add_argument("name", metavar="NAME")
        add_broker_option(p)

    p = add_command(
        commands,
        "status",
        cmd_status,
        help="per-wave and per-device progress",
        description="Show a deployment's rollout: each wave and each device (pending, applying, healthy, "
        "failed, rolled back, rejected, offline, waiting for its wave, superseded, reverted).",
        examples="  edgectl deploy status vision\n  edgectl deploy status vision --json",
    )
    p.add_argument("name", metavar="NAME")

    p = add_command(
        commands,
        "publish",
        cmd_publish,
        help="recompute and publish pending desired states",
        description="Recompute every device's desired state (devices provisioned since the last apply get "
        "theirs; states past half their validity are re-signed), then publish every state the broker has "
        "not acknowledged (it was down at apply time).",
        examples="  edgectl deploy publish --broker-url mqtt://127.0.0.1:1883",
    )
    add_broker_option(p)

    p = add_command(
        commands,
        "set-model",
        cmd_set_model,
        help="package a model version into a module and roll it out",
        description="Package MODEL[:VERSION] from the registry into MODULE's images (one per profile the "
        "module lists, pushed to the image registry; only the model layer is new when nothing else "
        "changed) and apply the deployment with them. Give the inference config the module was packaged "
        "with.",
        examples="  edgectl deploy set-model vision detector digits:4 --config inference.yaml\n"
        "  edgectl deploy set-model vision detector digits:latest --registry 127.0.0.1:5000\n"
        "  edgectl deploy set-model vision detector digits --follow   # and every later version",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("module", metavar="MODULE")
    p.add_argument("model", metavar="MODEL[:VERSION]", help="registered model (default version: the latest)")
    p.add_argument("--config", metavar="FILE", help="inference config (default: no-code ONNX)")
    p.add_argument("--registry", metavar="HOST:PORT", help="image registry (default: from the config)")
    p.add_argument("--repository", metavar="REPO", help="repository in the registry (default: the module)")
    p.add_argument("--no-smoke", action="store_true", help="skip starting each image before pushing")
    p.add_argument(
        "--follow",
        action="store_true",
        help="keep following MODEL: every version registered later is packaged and rolled out the same way",
    )
    add_broker_option(p)

    p = add_command(
        commands,
        "unfollow",
        cmd_unfollow,
        help="stop a module following a model's newest version",
        description="End the continuous deployment that 'set-model ... --follow' started; the module keeps "
        "the images it has (a 'set-model' with a version ends it too).",
        examples="  edgectl deploy unfollow vision detector",
    )
    p.add_argument("name", metavar="NAME")
    p.add_argument("module", metavar="MODULE")

    p = add_command(
        commands,
        "watch",
        cmd_watch,
        help="run the rollout controller",
        description="Ingest reported states and online messages, recompute desired states every "
        f"{RECOMPUTE_EVERY_S:g} s (new devices, re-signing), advance rollout waves when the current wave "
        "is healthy, halt (and revert, if the manifest says so) beyond max_failure_ratio, clear the "
        "retained messages of removed devices and publish pending desired states (what 'edgectl serve' "
        "runs in the background). When the broker is unreachable it says so and connects again. Runs "
        "until interrupted, or with --until-settled until no rollout is rolling.",
        examples="  edgectl deploy watch\n  edgectl deploy watch --until-settled --interval 1\n"
        "  edgectl deploy watch --broker-url mqtt://n1:1883,mqtt://n2:1883 \\\n"
        "      --reports-queue amqp://n1:5672/,amqp://n2:5672/",
        json_output=False,
    )
    p.add_argument("--interval", type=float, default=INTERVAL_S, metavar="SECONDS")
    p.add_argument("--until-settled", action="store_true", help="exit once no rollout is in progress")
    add_reports_queue_option(p)
    add_broker_option(p)


def add_reports_queue_option(p: argparse.ArgumentParser) -> None:
    """``--reports-queue``: the cloud worker takes reports from RabbitMQ's shared quorum queue."""
    p.add_argument(
        "--reports-queue",
        metavar="AMQP_URL[,AMQP_URL...]",
        help="RabbitMQ cluster: take reports from the shared quorum queue 'edge.reports' over AMQP "
        "(amqp://node:5672/ per node; credentials default to the cloud's MQTT user), so several cloud "
        "workers split the fleet; MQTT 3.1.1 without $share to --broker-url (see docs/brokers.md)",
    )
