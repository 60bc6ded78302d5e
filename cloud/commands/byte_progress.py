"""Byte progress on stderr: a rewritten line on a terminal, a line per 10% otherwise."""

from __future__ import annotations

from typing import TextIO

from cloud.commands.base import format_size


class ByteProgress:
    """Callable as ``progress(done, total, current_file)``; call ``finish()`` at the end."""

    def __init__(self, stream: TextIO, verb: str, *, enabled: bool) -> None:
        self.stream = stream
        self.verb = verb
        self.enabled = enabled
        self.tty = stream.isatty()
        self._last: tuple[int, str] | None = None
        self._drawn = False

    def __call__(self, done: int, total: int, current: str) -> None:
        if not self.enabled:
            return
        percent = 100 * done // total if total else 100
        step = percent if self.tty else percent // 10 * 10
        key = (step, current if self.tty else "")
        if key == self._last:
            return
        self._last = key
        line = f"{self.verb} {current}: {format_size(done)} / {format_size(total)} ({percent}%)"
        if self.tty:
            self.stream.write("\r\x1b[K" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._drawn = True

    def finish(self) -> None:
        """End the rewritten line on a terminal."""
        if self.enabled and self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
