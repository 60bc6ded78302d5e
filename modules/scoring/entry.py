"""Load an Azure ML-style entry script (``score.py`` with ``init()`` and ``run()``).

How ``run()`` is called depends on how it is declared (the same rules as Azure ML's server):

- ``@rawhttp`` (ours, or Azure ML's through ``azureml_compat``): ``run(request)`` with a
  ``ScoringRequest``; GET and OPTIONS reach it too.
- ``@input_schema`` (inference_schema): the JSON body's fields as keyword arguments.
- otherwise: ``run(data)`` with the body as a str.

Not supported: Azure ML's ``GET /score?x=1`` for scripts without ``@rawhttp`` (answered 405; use
POST, or ``@rawhttp`` to read ``request.query``), and Azure ML's ``driver_module`` indirection.

A script with a plain ``run(data)`` may opt into batching with ``run_batch(data_list)``: it gets
the bodies (str) of requests that arrived together, at most ``SCORING_MAX_BATCH_SIZE``, and
returns one result per body, in order. ``run()`` still answers requests with headers wanted.

A parameter named ``request_headers`` receives the request headers as a dict. ``run()`` is called
from the server's worker threads, up to ``SCORING_THREADS`` at once; ``init()`` once, in its own
thread, before the server reports ready.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from modules.scoring import azureml_compat
from modules.scoring.inference_schema_compat import is_schema_decorated
from modules.scoring.raw import is_raw

RunKind = Literal["plain", "schema", "raw"]
HEADERS_PARAM = "request_headers"


class EntryScriptError(RuntimeError):
    """The entry script cannot be used: missing file, import failure, missing or bad init/run."""


@dataclass(frozen=True)
class EntryScript:
    """A loaded entry script and how its ``run()`` must be called."""

    path: Path
    module: ModuleType
    init: Callable[[], Any]
    run: Callable[..., Any]
    kind: RunKind
    params: tuple[inspect.Parameter, ...]
    """``run``'s parameters, ``request_headers`` excluded; the first one receives the data."""
    wants_headers: bool
    run_batch: Callable[[list[str]], list[Any]] | None = None
    """The script's ``run_batch(data_list)``, when it has one (plain ``run`` only)."""

    @property
    def data_param(self) -> str:
        """The name of the parameter that receives the body (plain) or the request (raw)."""
        return self.params[0].name


def load_entry_script(path: Path, module_name: str = "entry_module") -> EntryScript:
    """Import the script at ``path`` (its folder goes first on ``sys.path``) and inspect ``run()``.

    Importing runs the script's top-level code; raise ``EntryScriptError`` on any problem, with the
    original exception chained.
    """
    path = path.resolve()
    if not path.is_file():
        raise EntryScriptError(f"entry script {path} does not exist")
    azureml_compat.install()
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise EntryScriptError(f"entry script {path} cannot be imported (is it a .py file?)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(module_name, None)
        raise EntryScriptError(f"importing entry script {path} raised {type(exc).__name__}: {exc}") from exc
    init = getattr(module, "init", None)
    run = getattr(module, "run", None)
    for name, func in (("init", init), ("run", run)):
        if not callable(func):
            raise EntryScriptError(f"entry script {path} has no {name}() function")
    assert init is not None and run is not None
    return _inspect_run(path, module, init, run)


def _inspect_run(
    path: Path, module: ModuleType, init: Callable[[], Any], run: Callable[..., Any]
) -> EntryScript:
    try:
        signature = inspect.signature(run)
    except (TypeError, ValueError) as exc:
        raise EntryScriptError(f"cannot read the signature of run() in {path}: {exc}") from exc
    allowed = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    bad = [p.name for p in signature.parameters.values() if p.kind not in allowed]
    if bad:
        raise EntryScriptError(
            f"run() in {path} cannot take positional-only, *args or **kwargs parameters ({', '.join(bad)})"
        )
    params = tuple(p for p in signature.parameters.values() if p.name != HEADERS_PARAM)
    wants_headers = len(params) < len(signature.parameters)
    if not params:
        raise EntryScriptError(f"run() in {path} must take an argument for the input data")
    raw, schema = is_raw(run), is_schema_decorated(run)
    if raw and schema:
        raise EntryScriptError(f"run() in {path} cannot be decorated with both @rawhttp and @input_schema")
    kind: RunKind = "raw" if raw else "schema" if schema else "plain"
    if kind != "schema" and any(p.default is inspect.Parameter.empty for p in params[1:]):
        raise EntryScriptError(f"run() in {path} may have only one parameter without a default value")
    run_batch = getattr(module, "run_batch", None)
    if run_batch is not None:
        if not callable(run_batch):
            raise EntryScriptError(f"run_batch in {path} is not a function")
        if kind != "plain":
            raise EntryScriptError(
                f"run_batch() in {path} needs a plain run(data): @rawhttp and @input_schema scripts are "
                "called one request at a time"
            )
    return EntryScript(
        path=path,
        module=module,
        init=init,
        run=run,
        kind=kind,
        params=params,
        wants_headers=wants_headers,
        run_batch=run_batch,
    )
