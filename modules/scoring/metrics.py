"""Request metrics in the Prometheus text exposition format (version 0.0.4), written by hand.

Updated only from the event loop thread, so no locks (``families`` read counters that one
other thread writes, e.g. a model's batch thread). ``route`` labels are route templates
(``/v2/models/{name}/infer``), never raw paths, to keep the number of series bounded.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

LATENCY_BUCKETS = (
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
"""Upper bounds in seconds: from a quarter millisecond (a small model's overhead) to a minute."""


MetricFamilies = dict[str, tuple[str, str, Callable[[], list[str]]]]
"""Metric families read at render time: name → (type, help, sample lines getter)."""


def label_value(value: str) -> str:
    """``value`` escaped for a Prometheus label."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _num(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))


class Histogram:
    """Counts per bucket (not cumulative until rendered), sum and count; latency buckets by default."""

    __slots__ = ("bounds", "count", "counts", "total")

    def __init__(self, bounds: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Record one value (a duration in seconds for latency histograms)."""
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value
        self.count += 1

    def render(self, name: str, labels: str) -> list[str]:
        """The ``_bucket``, ``_sum`` and ``_count`` lines."""
        lines = []
        cumulative = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            cumulative += n
            le = "+Inf" if bound == float("inf") else _num(bound)
            lines.append(f'{name}_bucket{{{labels},le="{le}"}} {cumulative}')
        lines.append(f"{name}_sum{{{labels}}} {self.total!r}")
        lines.append(f"{name}_count{{{labels}}} {self.count}")
        return lines


class Metrics:
    """Everything ``GET /metrics`` reports."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        self.errors: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.latency: defaultdict[str, Histogram] = defaultdict(Histogram)
        self.in_flight = 0
        self.providers: dict[str, str] = {}
        """model name → execution provider actually in use."""
        self.init_seconds: float | None = None
        self.ready = False
        self.gauges: dict[str, tuple[str, Callable[[], float]]] = {}
        """Extra gauges read at render time: name → (help, getter)."""
        self.families: MetricFamilies = {}
        """Extra metric families, e.g. the batchers'."""

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one finished request."""
        self.requests[route, status] += 1
        self.latency[route].observe(seconds)

    def error(self, route: str, reason: str) -> None:
        """Count one failed request by reason (bad_request, timeout, run_error, ...)."""
        self.errors[route, reason] += 1

    def render(self) -> str:
        """The exposition text."""
        out: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")

        family("scoring_requests_total", "counter", "HTTP requests answered, by route and status code.")
        for (route, code), n in sorted(self.requests.items()):
            out.append(f'scoring_requests_total{{route="{label_value(route)}",code="{code}"}} {n}')
        family("scoring_request_errors_total", "counter", "Requests that failed, by route and reason.")
        for (route, reason), n in sorted(self.errors.items()):
            labels = f'route="{label_value(route)}",reason="{label_value(reason)}"'
            out.append(f"scoring_request_errors_total{{{labels}}} {n}")
        family("scoring_request_duration_seconds", "histogram", "Time from request to response, by route.")
        for route, hist in sorted(self.latency.items()):
            out.extend(hist.render("scoring_request_duration_seconds", f'route="{label_value(route)}"'))
        family("scoring_requests_in_flight", "gauge", "Requests being handled now.")
        out.append(f"scoring_requests_in_flight {self.in_flight}")
        family("scoring_execution_provider_info", "gauge", "Execution provider running each model.")
        for model, provider in sorted(self.providers.items()):
            labels = f'model="{label_value(model)}",provider="{label_value(provider)}"'
            out.append(f"scoring_execution_provider_info{{{labels}}} 1")
        family("scoring_ready", "gauge", "1 once the model is loaded and init() has finished.")
        out.append(f"scoring_ready {int(self.ready)}")
        if self.init_seconds is not None:
            family("scoring_init_duration_seconds", "gauge", "Time taken to load the model and run init().")
            out.append(f"scoring_init_duration_seconds {self.init_seconds!r}")
        for name, (help_text, getter) in sorted(self.gauges.items()):
            family(name, "gauge", help_text)
            out.append(f"{name} {_num(getter())}")
        for name, (kind, help_text, lines) in sorted(self.families.items()):
            family(name, kind, help_text)
            out.extend(lines())
        return "\n".join(out) + "\n"


_MERGE_MIN = frozenset({"scoring_ready"})
"""Samples whose merged value is the smallest (ready only when every worker is)."""
_MERGE_MAX = frozenset({"scoring_init_duration_seconds", "scoring_execution_provider_info"})
"""Samples whose merged value is the largest; every other sample is summed."""


def merge_expositions(texts: Sequence[str]) -> str:
    """Several processes' exposition texts as one: the same series summed (counters, histogram
    buckets, in-flight and queue gauges), ``scoring_ready`` the smallest, init time and provider
    info the largest. Families and series keep the order they first appear in."""
    families: dict[str, tuple[list[str], dict[str, float]]] = {}
    current: dict[str, float] | None = None
    for text in texts:
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                name = line.split(" ", 3)[2]
                head, current = families.setdefault(name, ([], {}))
                if line not in head:
                    head.append(line)
                continue
            if not line or line.startswith("#") or current is None:
                continue
            series, _, raw = line.rpartition(" ")
            value = float(raw)
            base = series.split("{", 1)[0]
            if series not in current:
                current[series] = value
            elif base in _MERGE_MIN:
                current[series] = min(current[series], value)
            elif base in _MERGE_MAX:
                current[series] = max(current[series], value)
            else:
                current[series] += value
    out: list[str] = []
    for head, samples in families.values():
        out.extend(head)
        out.extend(f"{series} {_num(value)}" for series, value in samples.items())
    return "\n".join(out) + "\n"


def workers_lines(configured: int, reporting: int) -> str:
    """The ``scoring_workers`` and ``scoring_workers_reporting`` gauges of a merged scrape."""
    return (
        "# HELP scoring_workers Server processes sharing the port (SCORING_WORKERS).\n"
        "# TYPE scoring_workers gauge\n"
        f"scoring_workers {configured}\n"
        "# HELP scoring_workers_reporting Workers whose figures this scrape includes.\n"
        "# TYPE scoring_workers_reporting gauge\n"
        f"scoring_workers_reporting {reporting}\n"
    )
