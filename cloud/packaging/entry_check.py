"""Static checks of an entry script before anything is built: it parses and defines init() and run().

Nothing is imported or executed: the script's dependencies may exist only inside the image.
"""

from __future__ import annotations

import ast
from pathlib import Path

from cloud.packaging.errors import InputError

_Function = ast.FunctionDef | ast.AsyncFunctionDef


def _top_level_names(tree: ast.Module) -> dict[str, ast.AST]:
    """Names bound at module level: functions, classes, assignments, imports."""
    names: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
        elif isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:
                names[(alias.asname or alias.name).split(".")[0]] = node
    return names


def _required_positional(fn: _Function) -> int:
    args = fn.args
    positional = len(args.posonlyargs) + len(args.args)
    return positional - len(args.defaults)


def _accepts_one(fn: _Function) -> bool:
    args = fn.args
    return args.vararg is not None or len(args.posonlyargs) + len(args.args) >= 1


def check_entry_script(path: Path) -> None:
    """Raise InputError (naming the file and line) unless ``path`` defines ``init()`` and ``run(data)``."""
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise InputError(f"entry script {path}: cannot read: {exc.strerror or exc}") from None
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise InputError(f"entry script {path}:{exc.lineno}: syntax error: {exc.msg}") from None
    except ValueError as exc:
        raise InputError(f"entry script {path}: cannot parse: {exc}") from None
    names = _top_level_names(tree)
    missing = [name for name in ("init", "run") if name not in names]
    if missing:
        raise InputError(
            f"entry script {path}: no top-level {' or '.join(f'{m}()' for m in missing)} "
            "(an entry script defines init() to load the model and run(data) to score a request)"
        )
    init, run = names["init"], names["run"]
    if isinstance(init, _Function) and _required_positional(init) > 0:
        raise InputError(f"entry script {path}:{init.lineno}: init() must take no required arguments")
    if isinstance(run, _Function) and not _accepts_one(run):
        raise InputError(
            f"entry script {path}:{run.lineno}: run() takes no arguments; it must accept the request data"
        )
    for node in (init, run):
        if isinstance(node, ast.ClassDef):
            raise InputError(f"entry script {path}:{node.lineno}: {node.name} is a class, not a function")
