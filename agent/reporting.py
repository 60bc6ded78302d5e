"""How the agent's reports leave the device: full reports on change, small heartbeats, a local copy.

``Reporter.publish`` takes the report the reconcile loop built and decides what goes out:

- the **full report** (``ReportedState``, retained on ``edge/{d}/reported``) when it differs from
  the last one published (times, probe latencies and system load aside, see ``fingerprint``), when
  the system metrics moved meaningfully (``system_moved``), in every new MQTT session (what was
  queued offline is old news by then), and at least every ``report_refresh_s`` (1 h) so the cloud's
  view of the load stays roughly current;
- otherwise a **heartbeat** (``Heartbeat``, not retained, on ``edge/{d}/heartbeat``) every
  ``heartbeat_s``: a ~200-byte "still here, nothing changed" that keeps the device fresh in the
  cloud without resending the report (an idle device: well under 1 MB a day with the defaults).

Published reports carry the system metrics sampled then (with ``disk_low`` against the pull's
``min_free_mb``), the heartbeat period, a client conflict the link saw and the last rejected
desired state. A changed report is also written to ``<state_dir>/reported.json`` for
``edge-agent status``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import orjson

from agent.config import AgentConfig
from agent.metrics import AgentMetrics
from agent.sysmetrics import MetricsError, SystemSampler
from modules.contract import Heartbeat, Rejection, ReportedState, SystemMetrics

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


Sent = Literal["report", "heartbeat"] | None
"""What one ``Reporter.publish`` sent: the full report, a heartbeat, or nothing."""

MEMORY_STEP = 0.2
"""Used memory moving by this share of the total is news (a full report at once)."""
DISK_STEP = 0.2
DISK_STEP_MIN_MB = 100.0
"""Free disk moving by this share of what was free (and at least this many MB) is news."""
TEMPERATURE_STEP_C = 10.0


def system_moved(before: SystemMetrics | None, after: SystemMetrics | None) -> str | None:
    """Why ``after`` is news against the metrics last reported (None: it is not).

    CPU load never is (it swings from sample to sample; the hourly refresh carries it). The disk
    turning low or recovering always is, so the warning stands in the cloud before a pull fails.
    """
    if after is None or before is None:
        return None if after is before else "system metrics appeared or went away"
    if after.disk_low != before.disk_low:
        return "disk low" if after.disk_low else "disk no longer low"
    if abs(after.disk_free_mb - before.disk_free_mb) >= max(
        DISK_STEP * before.disk_free_mb, DISK_STEP_MIN_MB
    ):
        return f"free disk {before.disk_free_mb:.0f} -> {after.disk_free_mb:.0f} MB"
    if after.memory_total_mb and abs(after.memory_used_mb - before.memory_used_mb) >= (
        MEMORY_STEP * after.memory_total_mb
    ):
        return f"memory used {before.memory_used_mb:.0f} -> {after.memory_used_mb:.0f} MB"
    if (before.temperature_c is None) != (after.temperature_c is None) or (
        before.temperature_c is not None
        and after.temperature_c is not None
        and abs(after.temperature_c - before.temperature_c) >= TEMPERATURE_STEP_C
    ):
        return f"temperature {before.temperature_c} -> {after.temperature_c} C"
    return None


class Reporter:
    """Publishes reports and heartbeats through the link (None: only the local copy); see the module doc."""

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
        """When the last report or heartbeat went out (the next heartbeat is due ``heartbeat_s`` after it)."""
        self.last_report: ReportedState | None = None
        """The last full report published."""
        self._last_fingerprint: bytes | None = None
        self._reported_in_session = 0

    async def publish(self, report: ReportedState, now: datetime, last_rejection: Rejection | None) -> Sent:
        """Send ``report`` when it is news, else a heartbeat when one is due; what was sent."""
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
        last = self.last_report
        changed = current != self._last_fingerprint
        news = (
            last is None
            or changed
            or session != self._reported_in_session  # what was queued offline is old news now
            or (now - last.reported_at).total_seconds() >= self.config.report_refresh_s
        )
        heartbeat_due = (
            self.last_published is None
            or (now - self.last_published).total_seconds() >= self.config.heartbeat_s
        )
        if not news and not heartbeat_due:
            return None
        try:
            system = self.sampler.sample()
        except MetricsError as exc:
            log.debug("no system metrics: %s", exc)
            system = None
        moved = system_moved(last.system, system) if last is not None and not news else None
        if moved is not None:
            log.info("reporting at once: %s", moved)
        if not news and moved is None:
            assert last is not None
            await self._heartbeat(last, now)
            return "heartbeat"
        report = report.model_copy(update={"system": system})
        if self.link is not None:
            await self.link.publish_reported(report)
        self._last_fingerprint = current
        self.last_report = report
        self.last_published = now
        self._reported_in_session = session
        self.metrics.last_report_ts = time.time()
        # A refresh repeats the same report: the local copy for `edge-agent status` stands.
        if changed and self.local_copy:
            await asyncio.to_thread(write_report, Path(self.config.state_dir) / REPORT_FILE, report)
        log.debug("report queued: generation %d, %s", report.generation_applied, report.deployment_status)
        return "report"

    async def _heartbeat(self, last: ReportedState, now: datetime) -> None:
        if self.link is not None:
            await self.link.publish_heartbeat(
                Heartbeat(
                    device_id=last.device_id,
                    generation_applied=last.generation_applied,
                    report_at=last.reported_at,
                    heartbeat_s=self.config.heartbeat_s,
                    reported_at=now,
                )
            )
        self.last_published = now
        self.metrics.last_report_ts = time.time()


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
