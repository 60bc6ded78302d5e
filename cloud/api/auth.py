"""Operator tokens for the REST API: ``Authorization: Bearer <token>``.

Tokens come from ``$EDGE_API_TOKEN`` (one token), else from the token file (default
``<data dir>/api-tokens``; one token per line, ``#`` comments), which must not be readable by
group or others. When neither exists, a token is generated into a new file (mode 0600) and handed
back so ``edgectl serve`` can print it once. Presented tokens are compared in constant time.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "EDGE_API_TOKEN"
TOKEN_FILE = "api-tokens"
MIN_TOKEN_LENGTH = 16


class TokenError(Exception):
    """The token file or variable is unusable; the message names it and what to do."""


@dataclass(frozen=True)
class Tokens:
    """The accepted tokens; ``generated`` is the new token when one was just created."""

    values: tuple[bytes, ...]
    source: str
    generated: str | None = None

    def accepts(self, presented: str) -> bool:
        """True when ``presented`` equals one of the tokens (constant time for each)."""
        candidate = presented.encode("utf-8", errors="replace")
        found = False
        for token in self.values:
            found |= hmac.compare_digest(candidate, token)
        return found


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _check(token: str, where: str) -> bytes:
    if len(token) < MIN_TOKEN_LENGTH or not token.isprintable() or " " in token:
        raise TokenError(
            f"{where}: tokens must be at least {MIN_TOKEN_LENGTH} printable characters without spaces"
        )
    return token.encode("utf-8")


def _read_file(path: Path) -> Tokens:
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise TokenError(
                f"{path}: token file is readable by others (mode {mode:04o}); run: chmod 600 {path}"
            )
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TokenError(f"{path}: cannot read the token file: {getattr(e, 'strerror', None) or e}") from None
    values = tuple(
        _check(line.strip(), f"{path}:{n}")
        for n, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not values:
        raise TokenError(f"{path}: the token file holds no token (delete it to have one generated)")
    return Tokens(values, str(path))


def _create(path: Path) -> Tokens | None:
    """Write a new token file; None when another process created it first."""
    token = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    except OSError as e:
        raise TokenError(f"{path}: cannot create the token file: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"# edgectl serve operator tokens, one per line\n{token}\n")
    except OSError as e:
        with contextlib.suppress(OSError):
            path.unlink()
        raise TokenError(f"{path}: cannot write the token file: {e.strerror or e}") from None
    return Tokens((token.encode(),), str(path), generated=token)


def load_tokens(path: Path, env: Mapping[str, str] | None = None) -> Tokens:
    """The tokens from ``$EDGE_API_TOKEN``, else ``path`` (generating it on first use)."""
    env = os.environ if env is None else env
    from_env = env.get(TOKEN_ENV, "").strip()
    if from_env:
        return Tokens((_check(from_env, f"${TOKEN_ENV}"),), f"${TOKEN_ENV}")
    if not path.exists():
        created = _create(path)
        if created is not None:
            return created
    return _read_file(path)
