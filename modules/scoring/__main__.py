"""``python -m modules.scoring`` / ``edge-score``: run the scoring server (``--help`` lists the settings)."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Sequence

from modules.scoring.config import EXIT_CONFIG, ConfigError, load_config
from modules.scoring.workers import die_with_parent, supervise, worker_count


def main(argv: Sequence[str] | None = None) -> int:
    """Parse settings, run the server, and exit with its status."""
    try:
        config = load_config(os.environ, argv)
    except ConfigError as exc:
        print(f"edge-score: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(
        level=config.log_level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    if config.worker is None:
        workers = worker_count(config)
        if workers > 1:
            code = supervise(config, workers, sys.argv[1:] if argv is None else argv)
            logging.shutdown()
            return code
    else:
        die_with_parent(config.worker.parent_pid)
    from modules.scoring.server import serve  # not in the supervisor: it stays small

    try:
        import uvloop
    except ImportError:
        code = asyncio.run(serve(config))
    else:
        code = uvloop.run(serve(config))
    logging.shutdown()
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        # A thread the entry script started may still run; do not wait for it at exit.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
