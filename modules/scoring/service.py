"""What the HTTP handlers call: one ``ScoringService`` per server, entry-script or no-code.

Handlers stay thin: they read the request into a ``ScoreCall``, await the service's
``handle_score`` / ``handle_infer`` and send the ``Reply`` back. Those run the blocking work (an
entry script's run(), an unbatched model) in the inference pool; batched ONNX models wait for
their batch on the loop and run it in the batcher's thread (``batching.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from modules.scoring.metrics import MetricFamilies
from modules.scoring.pool import InferencePool
from modules.scoring.replies import Reply

INLINE_BYTES = 64 * 1024
"""Batched requests up to this size are decoded and answered on the event loop (tens of
microseconds: cheaper than two thread hand-overs); larger ones in the inference pool."""


@dataclass(frozen=True, slots=True)
class ScoreCall:
    """One request, as scoring work sees it."""

    method: str
    path: str
    headers: Mapping[str, str]
    query: Mapping[str, str]
    query_string: str
    body: bytes


@dataclass(frozen=True)
class ApiSchemas:
    """OpenAPI schemas (``example`` included where known) of ``/score``'s request and response."""

    request: dict[str, Any] | None = None
    response: dict[str, Any] | None = None
    source: str = "none"
    """Where they came from: inference_schema, module.json, model or none."""


@dataclass
class Readiness:
    """Whether the service has loaded; why not when it failed."""

    ready: bool = False
    error: str | None = None
    init_seconds: float | None = None
    providers: dict[str, str] = field(default_factory=dict)

    def reason(self) -> str:
        """Why the service is not ready."""
        if self.ready:
            return "ready"
        if self.error:
            return f"initialisation failed: {self.error}"
        return "still initialising (loading the model / running init())"


class ScoringService(Protocol):
    """The mode-specific part of the server."""

    mode: str
    accepts_raw_methods: bool
    """True when ``/score`` also takes GET and OPTIONS (raw-request entry scripts)."""

    def load(self) -> dict[str, str]:
        """Load the model(s) / run init(); blocking. Returns model name → execution provider."""
        ...

    def metric_families(self) -> MetricFamilies:
        """Metric families of the service's own for ``/metrics`` (name → type, help, sample lines)."""
        ...

    def close(self) -> None:
        """After the last request: stop the service's own threads."""
        ...

    def score(self, call: ScoreCall) -> Reply:
        """Answer ``/score``; blocking. Raises ClientError for bad input; other errors are 500s."""
        ...

    def infer(self, model: str, call: ScoreCall) -> Reply:
        """Answer ``/v2/models/{model}/infer``; blocking. Raises ClientError (404 for unknown models)."""
        ...

    async def handle_score(self, call: ScoreCall, pool: InferencePool) -> Reply:
        """``score`` as the server calls it: blocking work in ``pool``, never on the loop."""
        ...

    async def handle_infer(self, model: str, call: ScoreCall, pool: InferencePool) -> Reply:
        """``infer`` as the server calls it: blocking work in ``pool``, never on the loop."""
        ...

    def model_names(self) -> list[str]:
        """Names under ``/v2/models/``."""
        ...

    def metadata(self, model: str) -> dict[str, Any] | None:
        """Open Inference Protocol model metadata, or None for an unknown model."""
        ...

    def api_schemas(self) -> ApiSchemas:
        """Request and response schemas for the OpenAPI document."""
        ...

    def describe(self) -> str:
        """One ``key=value`` fragment for the start-up log line (models, versions)."""
        ...
