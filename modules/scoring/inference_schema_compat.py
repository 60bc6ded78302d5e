"""Support for entry scripts whose ``run()`` uses ``inference_schema`` decorators.

Like Azure ML's server: when ``run`` is decorated with ``@input_schema(...)``, the request body
must be a JSON object and each of ``run``'s parameters is taken from the field of the same name
(parameters with a default may be left out); ``inference_schema`` then converts each value to the
declared type (numpy array, pandas DataFrame, ...) before ``run`` sees it. The declared samples
give the OpenAPI document its request and response schemas and examples.

``inference_schema`` is imported only when a script already imported it, so the server does not
depend on it.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _schema_util() -> Any:
    """The ``inference_schema.schema_util`` module if the script loaded inference_schema, else None."""
    if "inference_schema" not in sys.modules:
        return None
    import inference_schema.schema_util as schema_util

    return schema_util


def is_schema_decorated(run: Callable[..., Any]) -> bool:
    """True when ``run`` carries ``inference_schema`` input or output schemas."""
    util = _schema_util()
    return bool(util is not None and util.is_schema_decorated(run))


def declared_schemas(run: Callable[..., Any]) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The (input, output) OpenAPI schemas, examples included, that ``run``'s decorators declare."""
    util = _schema_util()
    if util is None or not util.is_schema_decorated(run):
        return None, None
    from inference_schema._constants import INPUT_SCHEMA_ATTR, OUTPUT_SCHEMA_ATTR

    entry = util.get_schemas_dict().get(util._get_function_full_qual_name(run), {})
    return entry.get(INPUT_SCHEMA_ATTR), entry.get(OUTPUT_SCHEMA_ATTR)


def is_input_conversion_error(exc: BaseException) -> bool:
    """True when ``exc`` was raised by inference_schema converting the request (the client's mistake).

    The innermost Python frame of the traceback lies inside the inference_schema package when its
    conversion rejected a value (wrong shape, wrong type); errors from the script's own code do not.
    """
    if not isinstance(exc, ValueError | TypeError) or "inference_schema" not in sys.modules:
        return False
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return False
    package = Path(sys.modules["inference_schema"].__file__ or "").parent
    return Path(frames[-1].filename).is_relative_to(package)
