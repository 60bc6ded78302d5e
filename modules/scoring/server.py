"""Start-up and shutdown: listen first, then load the model / run init() in the background.

Exit status: 0 after SIGTERM/SIGINT, 2 for a configuration error or a port that cannot be bound,
3 when loading the model or ``init()`` fails (unless ``EXIT_ON_INIT_FAILURE=0``). With several
worker processes (``workers.py``) this is each worker's; the supervisor exits with the first
worker's status that ended on its own, or 1 when a worker got stuck.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import sys

from aiohttp import web

from modules.scoring.app import ScoringApp
from modules.scoring.config import EXIT_CONFIG, ServerConfig
from modules.scoring.entry_service import EntryScriptService
from modules.scoring.service import ScoringService

log = logging.getLogger("modules.scoring")

EXIT_INIT_FAILED = 3
SHUTDOWN_GRACE_S = 5.0
"""On SIGTERM, requests in flight get this long to finish, then 503 (container engines SIGKILL after 10 s)."""


def create_service(config: ServerConfig, *, script_module: str = "entry_module") -> ScoringService:
    """The service for the configured mode; ``script_module`` names the entry script's module
    (tests load many scripts into one process)."""
    if config.mode == "entry-script":
        assert config.entry_script is not None
        return EntryScriptService(
            config.entry_script,
            model_dir=config.model_dir,
            name=config.module_name,
            version=config.module_version,
            module=config.module,
            module_name=script_module,
            batching=config.batching,
            max_queue=config.max_queue,
            timeout_s=config.timeout_s,
        )
    from modules.scoring.onnx_service import OnnxService

    assert config.model_dir is not None
    return OnnxService(config)


def _fields(**values: object) -> str:
    return " ".join(f"{k}={v}" for k, v in values.items())


async def serve(config: ServerConfig, service: ScoringService | None = None) -> int:
    """Run the server until a signal arrives (0) or initialisation fails (3); see module doc."""
    scoring = ScoringApp(config, service or create_service(config))
    access_log = logging.getLogger("aiohttp.access") if config.log_access else None
    runner = web.AppRunner(
        scoring.application(),
        access_log=access_log,
        handle_signals=False,
        shutdown_timeout=SHUTDOWN_GRACE_S + 1,
    )
    await runner.setup()
    slot = config.worker
    site: web.BaseSite
    if slot is None:
        site = web.TCPSite(runner, config.host, config.port, backlog=1024)
    else:  # a worker: accept from the socket the supervisor bound
        site = web.SockSite(runner, socket.socket(fileno=slot.listen_fd))
    try:
        await site.start()
        if scoring.siblings is not None:
            await scoring.siblings.start()
    except OSError as exc:
        log.error("cannot listen on %s:%s: %s", config.host, config.port, exc)
        await runner.cleanup()
        return EXIT_CONFIG
    worker = {} if slot is None else {"worker": f"{slot.index}/{slot.count}"}
    log.info(
        "scoring listening %s",
        _fields(mode=config.mode, host=config.host, port=config.port, threads=config.threads, **worker),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    code = 0
    loading = asyncio.create_task(scoring.load())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait((loading, stopping), return_when=asyncio.FIRST_COMPLETED)
    if loading.done():
        if loading.result():
            providers = scoring.readiness.providers
            log.info(
                "scoring ready %s",
                _fields(
                    **worker,
                    mode=config.mode,
                    module=config.module_name,
                    version=config.module_version,
                    models=",".join(providers) or "-",
                    provider=",".join(sorted(set(providers.values()))) or "-",
                    threads=config.threads,
                    host=config.host,
                    port=config.port,
                    auth="on" if config.scoring_key else "off",
                    init_s=f"{scoring.readiness.init_seconds:.3f}",
                    detail=f"[{scoring.service.describe()}]",
                ),
            )
        elif config.exit_on_init_failure:
            print(f"edge-score: error: {scoring.readiness.reason()}", file=sys.stderr, flush=True)
            code = EXIT_INIT_FAILED
            stop.set()
        else:
            log.warning("staying up, not ready (EXIT_ON_INIT_FAILURE=0): %s", scoring.readiness.reason())
    await stop.wait()
    loading.cancel()
    log.info("scoring stopping %s", _fields(exit_code=code))
    loop.call_later(SHUTDOWN_GRACE_S, scoring.pool.abandon)
    await runner.cleanup()
    return code
