"""Handlers of the commands the cloud sends on ``edge/{d}/cmd/req/{id}``: logs, restart, ping.

``CommandHandler.handle`` turns a ``CommandRequest`` into a ``CommandResponse`` and never raises:
an unknown module or a runtime error becomes ``ok: false`` with the reason. ``restart`` goes
through the plan runner (so it is logged, counted and serialised with the reconcile pass) as a
``Restart`` action, and does not count towards the module's restart back-off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Protocol

import orjson

from agent.actions import Restart
from agent.runner import PlanRunner
from modules.contract import CommandRequest, CommandResponse, DesiredState, utcnow

log = logging.getLogger(__name__)


class LogSource(Protocol):
    """What the handler needs from a runtime besides the runner: the module logs."""

    async def logs(self, module: str, tail: int = 100) -> str:
        """The last ``tail`` lines of a module's output."""
        ...


class CommandHandler:
    """Answers commands about the modules of the active desired state."""

    def __init__(
        self,
        runtime: LogSource,
        runner: PlanRunner,
        active: Callable[[], DesiredState | None],
        status: Callable[[], dict[str, object]],
        after_restart: Callable[[str], None] = lambda _module: None,
    ) -> None:
        """``active``: the desired state the agent runs; ``status``: what ``ping`` answers with;
        ``after_restart``: called with the module after a restart (the agent counts it and wakes its
        loop to look again)."""
        self.runtime = runtime
        self.runner = runner
        self.active = active
        self.status = status
        self.after_restart = after_restart

    async def handle(self, request: CommandRequest) -> CommandResponse:
        """Run ``request``; the response says what happened or why not."""
        try:
            if request.command == "ping":
                output = orjson.dumps({"pong": True, **self.status()}, default=str).decode()
                return CommandResponse(id=request.id, ok=True, output=output)
            assert request.module is not None  # the contract requires it for logs and restart
            problem = self._unknown(request.module)
            if problem is not None:
                return CommandResponse(id=request.id, ok=False, error=problem)
            if request.command == "logs":
                text = await self.runtime.logs(request.module, request.tail)
                return CommandResponse(id=request.id, ok=True, output=text)
            return await self._restart(request)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("command %s (%s) failed: %s", request.id, request.command, exc)
            return CommandResponse(id=request.id, ok=False, error=str(exc) or type(exc).__name__)

    def _unknown(self, module: str) -> str | None:
        desired = self.active()
        if desired is None or module not in desired.modules:
            known = ", ".join(sorted(desired.modules)) if desired is not None else ""
            return f"module {module!r} is not in the desired state (modules: {known or 'none'})"
        return None

    async def _restart(self, request: CommandRequest) -> CommandResponse:
        assert request.module is not None
        desired = self.active()
        assert desired is not None
        if desired.modules[request.module].desired_status == "stopped":
            return CommandResponse(
                id=request.id, ok=False, error=f"module {request.module!r} is desired stopped"
            )
        action = Restart(module=request.module, reason=f"restart command {request.id}")
        error = await self.runner.run_now(action, utcnow())
        self.after_restart(request.module)
        if error is not None:
            return CommandResponse(id=request.id, ok=False, error=error)
        return CommandResponse(id=request.id, ok=True, output=f"module {request.module} restarted")
