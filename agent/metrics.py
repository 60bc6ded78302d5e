"""The agent's own Prometheus metrics, served as text on a loopback port (``metrics_port``).

``AgentMetrics`` holds a few counters and gauges that the loop and the plan runner update;
``render`` writes them in the Prometheus text format (0.0.4). ``MetricsServer`` answers
``GET /metrics`` on ``127.0.0.1`` with a minimal HTTP/1.1 responder on ``asyncio.start_server``
(the agent needs one endpoint, not a web framework). Series:

- ``edge_agent_reconcile_passes_total``
- ``edge_agent_actions_total{kind,result}`` (result: ``ok``, ``failed``, ``skipped``)
- ``edge_agent_modules{status}`` (reported runtime status of the desired modules)
- ``edge_agent_desired_rejections_total{code}`` (admission check that failed)
- ``edge_agent_rollbacks_total``
- ``edge_agent_generation_applied``
- ``edge_agent_last_report_timestamp_seconds``
- ``edge_agent_mqtt_connected`` (1 while the MQTT session is up)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from modules.contract import RuntimeStatus

log = logging.getLogger(__name__)

RUNTIME_STATUSES: tuple[RuntimeStatus, ...] = (
    "pulling",
    "created",
    "running",
    "unhealthy",
    "backoff",
    "stopped",
    "failed",
)
READ_TIMEOUT_S = 5.0


def _labels(**labels: str) -> str:
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels.items()
    )
    return "{" + inner + "}"


@dataclass
class AgentMetrics:
    """Counters and gauges of one agent; ``connected`` is read when scraped."""

    connected: Callable[[], bool] = lambda: False
    passes: int = 0
    actions: Counter[tuple[str, str]] = field(default_factory=Counter)
    rejections: Counter[str] = field(default_factory=Counter)
    rollbacks: int = 0
    modules: Counter[str] = field(default_factory=Counter)
    generation_applied: int = 0
    last_report_ts: float = 0.0

    def action(self, kind: str, result: str) -> None:
        """Count one action of ``kind`` ending with ``result``."""
        self.actions[(kind, result)] += 1

    def set_modules(self, statuses: Iterable[str]) -> None:
        """Replace the modules-by-status gauge with these statuses."""
        self.modules = Counter(statuses)

    def render(self) -> str:
        """The metrics in the Prometheus text exposition format."""
        lines = [
            "# HELP edge_agent_reconcile_passes_total Reconcile passes run.",
            "# TYPE edge_agent_reconcile_passes_total counter",
            f"edge_agent_reconcile_passes_total {self.passes}",
            "# HELP edge_agent_actions_total Plan actions by kind and result.",
            "# TYPE edge_agent_actions_total counter",
        ]
        lines += [
            f"edge_agent_actions_total{_labels(kind=kind, result=result)} {n}"
            for (kind, result), n in sorted(self.actions.items())
        ]
        lines += [
            "# HELP edge_agent_modules Desired modules by reported runtime status.",
            "# TYPE edge_agent_modules gauge",
        ]
        lines += [
            f"edge_agent_modules{_labels(status=status)} {self.modules.get(status, 0)}"
            for status in RUNTIME_STATUSES
        ]
        lines += [
            "# HELP edge_agent_desired_rejections_total Desired states rejected, by failed check.",
            "# TYPE edge_agent_desired_rejections_total counter",
        ]
        lines += [
            f"edge_agent_desired_rejections_total{_labels(code=code)} {n}"
            for code, n in sorted(self.rejections.items())
        ]
        lines += [
            "# HELP edge_agent_rollbacks_total Generations rolled back to the last known good one.",
            "# TYPE edge_agent_rollbacks_total counter",
            f"edge_agent_rollbacks_total {self.rollbacks}",
            "# HELP edge_agent_generation_applied Generation of the desired state the agent runs.",
            "# TYPE edge_agent_generation_applied gauge",
            f"edge_agent_generation_applied {self.generation_applied}",
            "# HELP edge_agent_last_report_timestamp_seconds When the last report was queued (Unix time).",
            "# TYPE edge_agent_last_report_timestamp_seconds gauge",
            f"edge_agent_last_report_timestamp_seconds {self.last_report_ts:.3f}",
            "# HELP edge_agent_mqtt_connected 1 while the MQTT session is up.",
            "# TYPE edge_agent_mqtt_connected gauge",
            f"edge_agent_mqtt_connected {1 if self.connected() else 0}",
        ]
        return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` on ``host:port`` (loopback); use as ``async with MetricsServer(...)``."""

    def __init__(self, metrics: AgentMetrics, port: int, host: str = "127.0.0.1") -> None:
        self.metrics = metrics
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> MetricsServer:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            method, _, rest = head.decode("latin-1").partition(" ")
            path = rest.partition(" ")[0].partition("?")[0]
            if method != "GET":
                status, body, ctype = "405 Method Not Allowed", b"only GET\n", "text/plain"
            elif path != "/metrics":
                status, body, ctype = "404 Not Found", b"see /metrics\n", "text/plain"
            else:
                status, body = "200 OK", self.metrics.render().encode()
                ctype = "text/plain; version=0.0.4; charset=utf-8"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
