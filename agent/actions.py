"""The steps the planner emits: a tagged union of frozen values, each naming its module and why.

A runner executes them in order from a table ``{kind: executor}``; nothing here does anything.
Runtime actions (``pull``, ``create``, ``start``, ``stop``, ``remove``, ``restart``) go to the
module runtime; ``set_restart_book`` goes to the agent's durable state; ``wait`` is a no-op that
says when to look again (back-off). A ``pull`` is started in the background and never waited on:
the runner moves on to the next action at once, and a later observation shows the image present.
When an action fails, the runner should skip the rest of that module's actions (keep going with
the other modules) and let the next tick plan again from a fresh observation.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from agent.restart import RestartBook
from modules.contract import DesiredModule, RegistryCredentialRef


@dataclass(frozen=True, kw_only=True)
class _Step:
    module: str
    reason: str

    def __str__(self) -> str:
        kind = getattr(self, "kind", type(self).__name__.lower())
        return f"{kind} {self.module}: {self.reason}"


@dataclass(frozen=True, kw_only=True)
class Pull(_Step):
    """Start pulling ``image`` in the background (``module`` is the first module that needs it)."""

    image: str
    credentials: RegistryCredentialRef | None = None
    kind: Literal["pull"] = field(default="pull", init=False)


@dataclass(frozen=True, kw_only=True)
class Create(_Step):
    """Create the module from ``spec`` (not started), labelled with ``config_hash`` and the
    ``generation`` of the desired state it comes from (``None`` when not known)."""

    spec: DesiredModule
    config_hash: str
    generation: int | None = None
    kind: Literal["create"] = field(default="create", init=False)


@dataclass(frozen=True, kw_only=True)
class Start(_Step):
    """Start a created or stopped module."""

    kind: Literal["start"] = field(default="start", init=False)


@dataclass(frozen=True, kw_only=True)
class Stop(_Step):
    """Stop a running module gracefully."""

    kind: Literal["stop"] = field(default="stop", init=False)


@dataclass(frozen=True, kw_only=True)
class Remove(_Step):
    """Remove a stopped module (its container or process record)."""

    kind: Literal["remove"] = field(default="remove", init=False)


@dataclass(frozen=True, kw_only=True)
class Restart(_Step):
    """Restart a module in place under its restart policy (stop if still running, then start)."""

    kind: Literal["restart"] = field(default="restart", init=False)


@dataclass(frozen=True, kw_only=True)
class Wait(_Step):
    """Nothing to do for the module before ``until`` (back-off); plan again then."""

    until: datetime
    kind: Literal["wait"] = field(default="wait", init=False)


@dataclass(frozen=True, kw_only=True)
class SetRestartBook(_Step):
    """Store ``book`` as the module's restart bookkeeping (``None`` forgets the module)."""

    book: RestartBook | None
    kind: Literal["set_restart_book"] = field(default="set_restart_book", init=False)


Action = Pull | Create | Start | Stop | Remove | Restart | Wait | SetRestartBook
ActionKind = Literal["pull", "create", "start", "stop", "remove", "restart", "wait", "set_restart_book"]
RUNTIME_KINDS: frozenset[ActionKind] = frozenset({"pull", "create", "start", "stop", "remove", "restart"})
"""Kinds a module runtime executes; the others are the agent's own (state, waiting)."""


@dataclass(frozen=True)
class Plan:
    """An immutable ordered list of actions, as the planner returns it."""

    actions: tuple[Action, ...] = ()
    holding: str | None = None
    """Why changes of the desired state are held back (its images are not all here yet), or None."""

    @property
    def is_empty(self) -> bool:
        """True when nothing needs doing now (no actions, or only waits)."""
        return all(a.kind == "wait" for a in self.actions)

    @property
    def wake_at(self) -> datetime | None:
        """The earliest time a ``wait`` asks to plan again, or ``None``."""
        return min((a.until for a in self.actions if isinstance(a, Wait)), default=None)

    def for_module(self, module: str) -> tuple[Action, ...]:
        """The actions that concern ``module``, in plan order."""
        return tuple(a for a in self.actions if a.module == module)

    def __iter__(self) -> Iterator[Action]:
        return iter(self.actions)

    def __len__(self) -> int:
        return len(self.actions)

    def __str__(self) -> str:
        return "\n".join(str(a) for a in self.actions) or "(nothing to do)"
