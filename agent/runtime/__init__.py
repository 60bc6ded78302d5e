"""Module runtimes: what executes the planner's runtime actions and observes what runs.

Two implementations share the ``ModuleRuntime`` protocol: ``DockerRuntime`` (containers through
Docker Engine, ``agent/runtime/docker.py``) and ``ProcessRuntime`` (local ``python -m
modules.scoring`` processes, ``agent/runtime/process.py``). A runtime does I/O and nothing else:
the planner decides, a runner calls ``executors(runtime)[action.kind](action)``.

Every action method raises :class:`RuntimeActionError` with a message naming the module and what
went wrong; ``pull`` never raises for a failed download (it runs in the background and the failure
shows in the next ``observe``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection
from datetime import datetime
from typing import Any, Protocol

from agent.actions import ActionKind, Create, Pull, Remove, Restart, Start, Stop
from agent.observed import ImageAvailability, ObservedModule
from modules.contract import HealthCheck

Observation = tuple[dict[str, ObservedModule], ImageAvailability]
"""What ``observe`` returns: this agent's modules by name, and the state of the images asked about."""

Executor = Callable[[Any], Awaitable[None]]


class RuntimeActionError(Exception):
    """An action could not be carried out; the message names the module and the cause."""

    def __init__(self, module: str, message: str) -> None:
        super().__init__(f"module {module}: {message}")
        self.module = module


class ModuleRuntime(Protocol):
    """Runs modules for one agent and reports only what it created itself."""

    async def observe(self, images: Collection[str] = ()) -> Observation:
        """This agent's modules now, and which of ``images`` (and of those pulled) are present,
        being pulled, or failed to pull."""
        ...

    async def pull(self, action: Pull) -> None:
        """Start fetching ``action.image`` in the background and return at once."""
        ...

    async def create(self, action: Create) -> None:
        """Create the module from ``action.spec`` (not started), recording ``action.config_hash``."""
        ...

    async def start(self, action: Start) -> None:
        """Start a created or exited module."""
        ...

    async def stop(self, action: Stop) -> None:
        """Stop a running module: SIGTERM, then SIGKILL after the grace period."""
        ...

    async def remove(self, action: Remove) -> None:
        """Remove a module (stopping it first if it still runs)."""
        ...

    async def restart(self, action: Restart) -> None:
        """Stop the module if it runs, then start it again."""
        ...

    async def logs(self, module: str, tail: int = 100) -> str:
        """The last ``tail`` lines the module wrote (stdout and stderr)."""
        ...

    def health_url(self, module: str, check: HealthCheck) -> str | None:
        """``http://host:port`` where ``check.port`` of the module answers (as of the last observe)."""
        ...

    async def collect_images(self, keep: Collection[str], now: datetime) -> list[str]:
        """Remove the images this runtime pulled that no module uses and ``keep`` does not name,
        once their grace period passed (``agent/runtime/image_gc.py``); what was removed."""
        ...

    async def close(self) -> None:
        """Cancel pulls in flight and release clients; running modules keep running."""
        ...


def executors(runtime: ModuleRuntime) -> dict[ActionKind, Executor]:
    """The table ``{kind: executor}`` for the kinds a runtime executes (``agent.actions.RUNTIME_KINDS``)."""
    return {
        "pull": runtime.pull,
        "create": runtime.create,
        "start": runtime.start,
        "stop": runtime.stop,
        "remove": runtime.remove,
        "restart": runtime.restart,
    }
