"""``edgectl model``: register, list, show, download and delete model versions."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from cloud.commands.base import (
    EXIT_FAILURE,
    CliError,
    add_command,
    format_size,
    format_table,
    parse_key_values,
    print_json,
    settings_from,
    store_errors,
)
from cloud.commands.byte_progress import ByteProgress
from cloud.commands.deploy import add_broker_option
from cloud.commands.package import register_model_profile
from cloud.store import Registry
from cloud.store.views import FRAMEWORKS, VersionSummary, VersionView

if TYPE_CHECKING:
    from cloud.continuous import FollowOutcome

REF_HELP = "NAME or NAME:VERSION (default: the latest version)"


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``iris`` → ("iris", None); ``iris:3`` → ("iris", 3); ``iris:latest`` → ("iris", None)."""
    name, sep, version = ref.partition(":")
    if not sep or version == "latest":
        return name, None
    if version.isdigit() and int(version) >= 1:
        return name, int(version)
    raise CliError(f"bad model reference {ref!r}: expected NAME or NAME:VERSION with VERSION a number from 1")


@contextmanager
def _registry(args: argparse.Namespace) -> Iterator[Registry]:
    with store_errors():
        registry = Registry.open(settings_from(args))
        try:
            yield registry
        finally:
            registry.close()


def _progress(args: argparse.Namespace, verb: str) -> ByteProgress:
    return ByteProgress(sys.stderr, verb, enabled=bool(args.progress) or sys.stderr.isatty())


def _tags(summary: VersionSummary) -> str:
    return ",".join(f"{k}={v}" for k, v in summary.tags.items())


def cmd_register(args: argparse.Namespace) -> int:
    """Register a file or folder as the next version of a model."""
    progress = _progress(args, "hashing")
    with _registry(args) as registry:
        try:
            view = registry.register(
                Path(args.path),
                args.name,
                tags=parse_key_values(args.tag, "--tag"),
                description=args.description,
                framework=args.framework,
                progress=progress,
                if_changed=args.if_changed,
            )
        finally:
            progress.finish()
        outcomes = _follow(args, registry, view) if view.created and not args.no_follow else []
    if outcomes:
        view = view.model_copy(update={"follows": [_where(o) for o in outcomes]})
    if args.json:
        print_json({**view.model_dump(mode="json"), "rollouts": [_rollout_json(o) for o in outcomes]})
    elif not view.created:
        print(
            f"{view.name}:{view.version} unchanged: its files are identical, "
            "nothing registered (--if-changed)"
        )
    else:
        print(
            f"registered {view.name}:{view.version} ({view.framework}, {view.file_count} "
            f"file{'s' if view.file_count != 1 else ''}, {format_size(view.size)})"
        )
        if view.identical_to is not None:
            print(
                f"note: the files are identical to {view.name}:{view.identical_to}; "
                "use --if-changed to register only when they differ",
                file=sys.stderr,
            )
        for o in outcomes:
            if o.rollout is not None:
                done = o.rollout.apply
                print(
                    f"{_where(o)} follows {view.name}: rolled out {o.rollout.model}, {done.new_generations} "
                    f"new desired state(s), {done.publish.published} published, "
                    f"{done.publish.pending} pending"
                )
            else:
                print(f"{_where(o)} follows {view.name}: not rolled out: {o.error}", file=sys.stderr)
    return EXIT_FAILURE if any(o.error for o in outcomes) else 0


def _where(outcome: FollowOutcome) -> str:
    return f"{outcome.follow.deployment}/{outcome.follow.module}"


def _rollout_json(outcome: FollowOutcome) -> dict[str, object]:
    done = outcome.rollout
    return {
        "deployment": outcome.follow.deployment,
        "module": outcome.follow.module,
        "error": outcome.error,
        "images": done.images if done else None,
        "new_generations": done.apply.new_generations if done else 0,
    }


def _follow(args: argparse.Namespace, registry: Registry, view: VersionView) -> list[FollowOutcome]:
    """Roll the new version out to the modules that follow the model (continuous deployment)."""
    from cloud import continuous
    from cloud.commands.deploy import endpoint_from, open_fleet
    from cloud.packaging.progress import LinePrinter

    if not continuous.follows(registry.db, model=view.name):
        return []
    with open_fleet(args) as fleet, store_errors():
        return continuous.follow_new_version(
            fleet,
            registry,
            view.name,
            view.version,
            endpoint=endpoint_from(args),
            progress=LinePrinter(sys.stderr),
        )


def cmd_list(args: argparse.Namespace) -> int:
    """List model versions."""
    with _registry(args) as registry:
        versions = registry.list_versions(args.name, parse_key_values(args.tag, "--tag"))
    if args.json:
        print_json([v.model_dump(mode="json") for v in versions])
        return 0
    if not versions:
        print("no model versions registered" + (f" for {args.name!r}" if args.name else ""), file=sys.stderr)
        return 0
    rows = [
        (
            v.name,
            v.version,
            v.framework,
            v.file_count,
            format_size(v.size),
            v.created_at.strftime("%Y-%m-%d %H:%M:%SZ"),
            _tags(v),
        )
        for v in versions
    ]
    print(format_table(("NAME", "VERSION", "FRAMEWORK", "FILES", "SIZE", "CREATED", "TAGS"), rows))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """Show one version: metadata, files with sizes and hashes, deployments using it."""
    name, version = parse_ref(args.ref)
    with _registry(args) as registry:
        view = registry.show(name, version)
    if args.json:
        print_json(view.model_dump(mode="json"))
        return 0
    fields = [
        ("name", f"{view.name}:{view.version}"),
        ("framework", view.framework),
        ("created", view.created_at.isoformat()),
        ("size", f"{format_size(view.size)} in {view.file_count} file{'s' if view.file_count != 1 else ''}"),
        ("source", view.source),
        ("description", view.description or "-"),
        ("tags", _tags(view) or "-"),
        ("deployments", ", ".join(view.deployments) or "-"),
    ]
    width = max(len(k) for k, _ in fields)
    print("\n".join(f"{k + ':':<{width + 1}} {v}" for k, v in fields))
    print()
    print(format_table(("PATH", "SIZE", "SHA256"), [(f.path, f.size, f.sha256) for f in view.files]))
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    """Write a version's files into a folder, checking every hash."""
    name, version = parse_ref(args.ref)
    progress = _progress(args, "writing")
    with _registry(args) as registry:
        try:
            result = registry.download(name, version, Path(args.out), overwrite=args.force, progress=progress)
        finally:
            progress.finish()
    if args.json:
        print_json(result.model_dump(mode="json"))
    else:
        ref = f"{result.name}:{result.version}"
        print(f"wrote {len(result.files)} files of {ref} to {result.out_dir} (hashes verified)")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete one version, or every version with --all; refused while a deployment uses it."""
    name, version = parse_ref(args.ref)
    if version is None and not args.all:
        raise CliError(f"give a version ({name}:VERSION) or --all to delete every version of {name!r}")
    if version is not None and args.all:
        raise CliError(f"--all deletes every version: give {name!r} without a version")
    with _registry(args) as registry:
        result = registry.delete(name, version, all_versions=args.all)
    if args.json:
        print_json(result.model_dump(mode="json"))
    else:
        numbers = ", ".join(f"{result.name}:{v}" for v in result.versions)
        print(f"deleted {numbers} (freed {format_size(result.bytes_freed)} in {result.blobs_removed} blobs)")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``model`` group."""
    group = subparsers.add_parser(
        "model",
        help="register and manage model versions",
        description="Register trained models (files or folders) and manage their versions. Files are stored "
        "once per content (sha256) in the data directory; versions are numbered per name.",
    )
    commands = group.add_subparsers(dest="model_command", metavar="COMMAND", required=True)

    p = add_command(
        commands,
        "register",
        cmd_register,
        help="register a file or folder as a new model version",
        description="Register a model file or folder as the next version of NAME.",
        examples="  edgectl model register digits.onnx --name digits --tag stage=dev\n"
        "  edgectl model register ./iris-model/ --name iris --framework sklearn --description 'iris SVC'\n"
        "  edgectl model register big/ --name detector --progress --json",
    )
    p.add_argument("path", metavar="PATH", help="model file or folder")
    p.add_argument("--name", required=True, help="model name: lowercase letters, digits, '-', '_', '.'")
    p.add_argument("--tag", action="append", metavar="KEY=VALUE", help="tag the version (repeatable)")
    p.add_argument("--description", default="", help="free text stored with the version")
    p.add_argument("--framework", choices=FRAMEWORKS, help="default: guessed from file suffixes")
    p.add_argument(
        "--if-changed",
        action="store_true",
        help="register only when the files differ from the latest version (else say so and exit 0)",
    )
    p.add_argument(
        "--progress", action="store_true", help="report bytes hashed on stderr (always on a terminal)"
    )
    p.add_argument(
        "--no-follow",
        action="store_true",
        help="do not roll the new version out to the deployments that follow this model",
    )
    add_broker_option(p)

    p = add_command(
        commands,
        "list",
        cmd_list,
        help="list model versions",
        description="List registered model versions, optionally of one model or with given tags.",
        examples="  edgectl model list\n"
        "  edgectl model list iris --json\n"
        "  edgectl model list --tag stage=prod",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help="only this model")
    p.add_argument(
        "--tag", action="append", metavar="KEY=VALUE", help="only versions with this tag (repeatable)"
    )

    p = add_command(
        commands,
        "show",
        cmd_show,
        help="show a version's files, sizes and hashes",
        description="Show a model version: metadata, files with sizes and sha256, deployments using it.",
        examples="  edgectl model show iris\n  edgectl model show iris:2 --json",
    )
    p.add_argument("ref", metavar="REF", help=REF_HELP)

    p = add_command(
        commands,
        "download",
        cmd_download,
        help="write a version's files into a folder",
        description="Reconstruct a model version's files under DIR, verifying each file's sha256.",
        examples="  edgectl model download iris:2 --out ./iris-v2\n"
        "  edgectl model download iris --out . --force",
    )
    p.add_argument("ref", metavar="REF", help=REF_HELP)
    p.add_argument("--out", required=True, metavar="DIR", help="destination folder (created if missing)")
    p.add_argument("--force", action="store_true", help="overwrite files that already exist")
    p.add_argument(
        "--progress", action="store_true", help="report bytes written on stderr (always on a terminal)"
    )

    p = add_command(
        commands,
        "delete",
        cmd_delete,
        help="delete a version (or all versions) not used by a deployment",
        description="Delete a model version, or every version with --all. Refused while a deployment "
        "uses it. Blobs no other version needs are removed; version numbers are never reused.",
        examples="  edgectl model delete iris:1\n  edgectl model delete iris --all --json",
    )
    p.add_argument("ref", metavar="REF", help="NAME:VERSION, or NAME with --all")
    p.add_argument("--all", action="store_true", help="delete every version of the model and its name")
    register_model_profile(commands)
