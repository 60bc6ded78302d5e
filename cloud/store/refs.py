"""Model references as operators write them: ``NAME``, ``NAME:latest`` or ``NAME:VERSION``."""

from __future__ import annotations

from cloud.store.errors import InvalidInputError


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
