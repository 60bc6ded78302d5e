"""Operator tokens: the Authorization header, constant-time matching, the token file's rules."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from cloud.api.auth import TOKEN_ENV, TokenError, Tokens, bearer_token, load_tokens


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
        ("Basic abc", None),
        ("Bearer", None),
        ("Bearer   ", None),
        ("", None),
        (None, None),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_tokens_accept_only_their_own() -> None:
    tokens = Tokens((b"first-token-0123456789", b"second-token-0123456789"), "test")
    assert tokens.accepts("first-token-0123456789")
    assert tokens.accepts("second-token-0123456789")
    assert not tokens.accepts("first-token-012345678")
    assert not tokens.accepts("")
    assert not tokens.accepts("ünïcode-token-0123456789")


def test_generated_once_into_a_private_file(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "api-tokens"
    first = load_tokens(path, env={})
    assert first.generated is not None and len(first.generated) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = load_tokens(path, env={})
    assert again.generated is None and again.accepts(first.generated)


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    tokens = load_tokens(tmp_path / "api-tokens", env={TOKEN_ENV: "env-token-0123456789"})
    assert tokens.accepts("env-token-0123456789") and tokens.source == f"${TOKEN_ENV}"
    assert not (tmp_path / "api-tokens").exists()


def test_file_with_several_tokens_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "api-tokens"
    path.write_text("# ops team\nalice-token-0123456789\n\n  bob-token-0123456789  \n")
    path.chmod(0o600)
    tokens = load_tokens(path, env={})
    assert tokens.accepts("alice-token-0123456789") and tokens.accepts("bob-token-0123456789")
    assert not tokens.accepts("# ops team")


@pytest.mark.parametrize(
    ("content", "mode", "message"),
    [
        ("good-token-0123456789\n", 0o644, "chmod 600"),
        ("# nothing\n\n", 0o600, "holds no token"),
        ("short\n", 0o600, "api-tokens:1: tokens must be at least 16"),
    ],
)
def test_bad_token_files(tmp_path: Path, content: str, mode: int, message: str) -> None:
    path = tmp_path / "api-tokens"
    path.write_text(content)
    path.chmod(mode)
    with pytest.raises(TokenError, match=message):
        load_tokens(path, env={})


def test_short_environment_token(tmp_path: Path) -> None:
    with pytest.raises(TokenError, match=r"\$EDGE_API_TOKEN: tokens must be at least 16"):
        load_tokens(tmp_path / "api-tokens", env={TOKEN_ENV: "short"})
