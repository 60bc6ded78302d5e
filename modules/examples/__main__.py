"""``python -m modules.examples build OUT_DIR [--only digits|convnet|diabetes] [--json]``.

Builds each example into ``OUT_DIR/<name>/`` and says what it wrote; ``--json`` prints one JSON
object on stdout (progress lines then go to stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from modules.examples.convnet import build_convnet_onnx
from modules.examples.diabetes import build_diabetes_model
from modules.examples.digits import build_digits_onnx

BUILDERS: dict[str, Callable[[Path], Path]] = {
    "digits": build_digits_onnx,
    "convnet": build_convnet_onnx,
    "diabetes": build_diabetes_model,
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m modules.examples", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the example models and write their module folders")
    b.add_argument("out_dir", type=Path, help="folder to build into (OUT_DIR/<name>/ per example)")
    b.add_argument("--only", choices=sorted(BUILDERS), help="build just this example")
    b.add_argument("--json", action="store_true", help="print what was written as JSON on stdout")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    progress = sys.stderr if args.json else sys.stdout
    names = [args.only] if args.only else list(BUILDERS)
    written: dict[str, dict[str, object]] = {}
    for name in names:
        folder = args.out_dir / name
        print(f"building {name} into {folder} ...", file=progress, flush=True)
        start = time.perf_counter()
        model = BUILDERS[name](folder)
        files = sorted(p.name for p in folder.iterdir() if p.is_file())
        written[name] = {"dir": str(folder.resolve()), "model": str(model.resolve()), "files": files}
        took = time.perf_counter() - start
        print(f"  {name}: {len(files)} files in {took:.1f}s: {', '.join(files)}", file=progress, flush=True)
    if args.json:
        print(json.dumps(written, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
