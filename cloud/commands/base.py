"""What every ``edgectl`` command shares: errors, common options, settings and output helpers."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from cloud.config import Settings, resolve_settings
from cloud.store.errors import InUseError, InvalidInputError, NotFoundError, StoreError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

Handler = Callable[[argparse.Namespace], int]


class CliError(Exception):
    """An error for the operator: printed as ``edgectl: error: <message>``, then exit ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _common_options() -> argparse.ArgumentParser:
    """Options accepted before the group and after the command; defaults live on the top parser."""
    parser = argparse.ArgumentParser(add_help=False)
    add_global_options(parser, argparse.SUPPRESS)
    return parser


def add_global_options(parser: argparse.ArgumentParser, default: Any = None) -> None:
    """``--data-dir``, ``--db-url`` and ``--debug`` (``default`` is SUPPRESS on subcommands)."""
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        default=default,
        help="state and model blobs (default: $EDGE_DATA_DIR or ~/.edgedeploy)",
    )
    parser.add_argument(
        "--db-url",
        metavar="URL",
        default=default,
        help="database URL: sqlite:///path or postgresql://user@host/db (default: $EDGE_DB_URL or "
        "SQLite in the data directory)",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default if default is argparse.SUPPRESS else False,
        help="print tracebacks of unexpected errors",
    )


COMMON = _common_options()


def add_command(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    handler: Handler,
    *,
    help: str,
    description: str,
    examples: str = "",
    json_output: bool = True,
) -> argparse.ArgumentParser:
    """Add a leaf command with the common options, ``--json`` and an examples epilog."""
    parser = subparsers.add_parser(
        name,
        help=help,
        description=description,
        epilog=f"examples:\n{examples}" if examples else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[COMMON],
    )
    if json_output:
        parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    parser.set_defaults(func=handler)
    return parser


def settings_from(args: argparse.Namespace) -> Settings:
    """The data directory and database URL from the flags and the environment."""
    return resolve_settings(getattr(args, "data_dir", None), getattr(args, "db_url", None))


@contextmanager
def store_errors() -> Iterator[None]:
    """Turn store errors into CliErrors: bad input exits 2, failures of the store exit 1."""
    try:
        yield
    except (InvalidInputError, NotFoundError, InUseError) as e:
        raise CliError(str(e), EXIT_USAGE) from e
    except StoreError as e:
        raise CliError(str(e), EXIT_FAILURE) from e
    except SQLAlchemyError as e:
        detail = str(getattr(e, "orig", None) or e).strip().splitlines()
        raise CliError(f"database error: {detail[0] if detail else type(e).__name__}", EXIT_FAILURE) from e


def parse_key_values(items: Sequence[str] | None, option: str) -> dict[str, str]:
    """``["k=v", ...]`` to a dict; CliError naming the option on a malformed or repeated key."""
    out: dict[str, str] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"{option} {item!r}: expected KEY=VALUE")
        if key in out:
            raise CliError(f"{option} {key!r} given twice")
        out[key] = value
    return out


def print_json(data: Any) -> None:
    """Write ``data`` as indented JSON to stdout."""
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces, headers first."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells)


def format_size(n: int) -> str:
    """Bytes in binary units: ``512 B``, ``1.5 KiB``, ``3.2 GiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
