"""Let unmodified Azure ML raw-mode scripts import ``AMLRequest``, ``rawhttp`` and ``AMLResponse``.

Azure ML scripts import them from ``azureml.contrib.services.aml_request`` / ``aml_response``
(azureml-core) or ``azureml_inference_server_http.api.aml_request`` / ``aml_response``. Azure's
classes are Flask objects that only Azure's own server understands, so inside this server those
four module names always resolve to the equivalents defined here, even when azureml is installed.
Parent packages (``azureml``, ``azureml.contrib``, ...) are synthesised only when they are not
installed, so a real azureml-core keeps working for everything else.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import json
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any

from modules.scoring.raw import ScoringRequest, ScoringResponse, rawhttp

AMLRequest = ScoringRequest


class AMLResponse(ScoringResponse):
    """Azure ML's response signature on top of ``ScoringResponse``.

    ``json_str=True`` sends ``message`` as JSON; otherwise a str or bytes ``message`` is sent as
    is, and anything else as JSON.
    """

    __slots__ = ()

    def __init__(
        self,
        message: Any,
        status_code: int,
        response_headers: Mapping[str, str] | None = None,
        json_str: bool = False,
        run_function_failed: bool = False,
    ) -> None:
        if message is None:
            body: Any = b""
        elif json_str:
            body = json.dumps(message).encode()
        else:
            body = message
        ctype = "application/json" if json_str and message is not None else None
        super().__init__(body, status_code, response_headers, content_type=ctype)


_LEAVES: dict[str, dict[str, Any]] = {
    "azureml.contrib.services.aml_request": {"AMLRequest": AMLRequest, "rawhttp": rawhttp},
    "azureml.contrib.services.aml_response": {"AMLResponse": AMLResponse},
    "azureml_inference_server_http.api.aml_request": {"AMLRequest": AMLRequest, "rawhttp": rawhttp},
    "azureml_inference_server_http.api.aml_response": {"AMLResponse": AMLResponse},
}
_PARENTS = {p for name in _LEAVES for p in (name.rsplit(".", i)[0] for i in range(1, name.count(".") + 1))}


class _CompatFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the leaf modules always, and their parent packages when nothing else provides them."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname in _LEAVES:
            return importlib.util.spec_from_loader(fullname, self)
        if fullname in _PARENTS and not self._provided_elsewhere(fullname, path):
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def _provided_elsewhere(self, fullname: str, path: Sequence[str] | None) -> bool:
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            if finder.find_spec(fullname, path) is not None:
                return True
        return False

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        module.__dict__.update(_LEAVES.get(module.__name__, {}))
        if module.__name__ in _PARENTS:
            module.__path__ = []


_FINDER = _CompatFinder()


def install() -> None:
    """Put the compatibility finder first on ``sys.meta_path`` (idempotent)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
