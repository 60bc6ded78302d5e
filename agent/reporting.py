"""How the agent's reports leave the device: deduplicated, with heartbeats, and a local copy.

``Reporter.publish`` takes the report the reconcile loop built and decides whether it goes out: a
report that differs from the last one published (times, probe latencies and system load aside)
goes at once; an unchanged one only every ``heartbeat_s`` and once in every new MQTT session (what
was queued offline is old news by then). Published reports carry the system metrics sampled then,
the heartbeat period, a client conflict the link saw and the last rejected desired state. A
changed report is also written to ``<state_dir>/reported.json`` for ``edge-agent status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from agent.config import AgentConfig
from agent.metrics import AgentMetrics
from agent.sysmetrics import MetricsError, SystemSampler
from modules.contract import Rejection, ReportedState

if TYPE_CHECKING:
    from agent.agent import AgentLink

log = logging.getLogger(__name__)

REPORT_FILE = "reported.json"


def fingerprint(report: ReportedState) -> bytes:
    """The report without what changes on every probe (times, latencies, system load)."""
    data = report.model_dump(mode="json", exclude={"reported_at", "system"})
    for module in data["modules"].values():
        if module.get("health"):
            module["health"] = {k: module["health"][k] for k in ("live", "ready", "error")}
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS)


class Reporter:
    """Publishes reports through the link (None: only the local copy); see the module docstring."""

    def __init__(
        self,
        config: AgentConfig,
        link: AgentLink | None,
        sampler: SystemSampler,
        metrics: AgentMetrics,
        *,
        local_copy: bool = True,
    ) -> None:
        self.config = config
        self.link = link
        self.sampler = sampler
        self.metrics = metrics
        self.local_copy = local_copy
        self.last_published: datetime | None = None
        """When the last report went out (the next heartbeat is due ``heartbeat_s`` after it)."""
        self._last_fingerprint: bytes | None = None
        self._reported_in_session = 0

    async def publish(self, report: ReportedState, now: datetime, last_rejection: Rejection | None) -> bool:
        """Send ``report`` when it changed or a heartbeat is due; whether it was sent."""
        conflict = self.link.client_conflict if self.link is not None else None
        report = report.model_copy(
            update={
                "heartbeat_s": self.config.heartbeat_s,
                "client_conflict": conflict,
                "last_rejection": last_rejection,
            }
        )
        current = fingerprint(report)
        session = self.link.sessions if self.link is not None else 0
        due = (
            self.last_published is None
            or (now - self.last_published).total_seconds() >= self.config.heartbeat_s
            or session != self._reported_in_session  # what was queued offline is old news now
        )
        if current == self._last_fingerprint and not due:
            return False
        try:
            system = self.sampler.sample()
        except MetricsError as exc:
            log.debug("no system metrics: %s", exc)
            system = None
        report = report.model_copy(update={"system": system})
        if self.link is not None:
            await self.link.publish_reported(report)
        changed = current != self._last_fingerprint
        self._last_fingerprint = current
        self.last_published = now
        self._reported_in_session = session
        self.metrics.last_report_ts = time.time()
        # Heartbeats repeat the same report: the local copy for `edge-agent status` stands.
        if changed and self.local_copy:
            await asyncio.to_thread(write_report, Path(self.config.state_dir) / REPORT_FILE, report)
        log.debug("report queued: generation %d, %s", report.generation_applied, report.deployment_status)
        return True


def write_report(path: Path, report: ReportedState) -> None:
    """The last report, for ``edge-agent status`` (replaced atomically, not fsynced: it is a copy)."""
    tmp = path.with_name(f".{path.name}.tmp")
    data = report.model_dump_json(indent=1).encode()
    try:
        tmp.write_bytes(data)
    except FileNotFoundError:  # no state saved yet: the folder is made once
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(data)
    os.replace(tmp, path)


def read_report(state_dir: Path) -> ReportedState | None:
    """The last report the agent wrote in ``state_dir``, if any."""
    with contextlib.suppress(FileNotFoundError):
        return ReportedState.model_validate_json((state_dir / REPORT_FILE).read_bytes())
    return None
