"""Names and model references as operators write them: ``NAME``, ``NAME:latest``, ``NAME:VERSION``."""

from __future__ import annotations

from pydantic import TypeAdapter, ValidationError

from cloud.store.errors import InvalidInputError
from modules.contract import Name

_NAME: TypeAdapter[str] = TypeAdapter(Name)


def check_name(value: str, what: str) -> str:
    """``value`` if it follows the contract's Name rules, else InvalidInputError ("invalid <what>: ...")."""
    try:
        return _NAME.validate_python(value)
    except ValidationError as e:
        raise InvalidInputError(
            f"invalid {what}: {e.errors()[0]['msg'].removeprefix('Value error, ')}"
        ) from None


def parse_model_ref(ref: str, *, require_version: bool = False) -> tuple[str, int | None]:
    """``digits`` → ("digits", None) (latest); ``digits:3`` → ("digits", 3).

    With ``require_version`` a version number must be given. Raises InvalidInputError naming the
    reference otherwise.
    """
    name, sep, version = ref.partition(":")
    if name and (not sep or version == "latest") and not require_version:
        return name, None
    if name and version.isdigit() and int(version) >= 1:
        return name, int(version)
    expected = "NAME:VERSION" if require_version else "NAME, NAME:latest or NAME:VERSION"
    raise InvalidInputError(f"model reference {ref!r}: expected {expected} with VERSION a number from 1")
