"""Command-line output into a pipe whose reader went away (``edgectl device list | head``)."""

from __future__ import annotations

import os
import sys

EXIT_BROKEN_PIPE = 141
"""128 + SIGPIPE: what a shell reports for a tool killed by a closed pipe."""


def quiet_broken_pipe() -> int:
    """After a BrokenPipeError on stdout: point stdout at /dev/null, so the interpreter's final
    flush does not print a second error, and return the exit status to use."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)
    return EXIT_BROKEN_PIPE
