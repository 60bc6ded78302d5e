"""Bearer key checks."""

from __future__ import annotations

import pytest

from modules.scoring.auth import KeyCheck


@pytest.mark.parametrize(
    ("header", "allowed"),
    [
        ("Bearer s3cret", True),
        ("bearer s3cret", True),
        ("  Bearer   s3cret ", True),
        ("Bearer s3cret2", False),
        ("Bearer ", False),
        ("Basic s3cret", False),
        ("s3cret", False),
        (None, False),
        ("", False),
    ],
)
def test_allows(header: str | None, allowed: bool) -> None:
    assert KeyCheck("s3cret").allows(header) is allowed


def test_problem_never_echoes_the_key() -> None:
    assert "missing" in KeyCheck.problem(None)
    assert "Bearer scheme" in KeyCheck.problem("Basic abc")
    message = KeyCheck.problem("Bearer guess")
    assert "wrong key" in message and "guess" not in message


def test_empty_key_rejected() -> None:
    with pytest.raises(ValueError, match="must not be empty"):
        KeyCheck("")
