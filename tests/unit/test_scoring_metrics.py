"""Prometheus text rendering of the scoring metrics."""

from __future__ import annotations

import pytest

from modules.scoring.metrics import LATENCY_BUCKETS, Metrics, merge_expositions


def _lines(text: str) -> dict[str, str]:
    return {
        line.rsplit(" ", 1)[0]: line.rsplit(" ", 1)[1]
        for line in text.splitlines()
        if not line.startswith("#")
    }


def test_counters_histogram_and_gauges() -> None:
    m = Metrics()
    m.observe("/score", 200, 0.0002)
    m.observe("/score", 200, 0.003)
    m.observe("/score", 504, 61.0)
    m.error("/score", "timeout")
    m.providers["digits"] = "CPUExecutionProvider"
    m.init_seconds = 1.5
    m.ready = True
    m.in_flight = 2
    m.gauges["scoring_inference_threads"] = ("Worker threads.", lambda: 4)
    text = m.render()
    values = _lines(text)
    assert values['scoring_requests_total{route="/score",code="200"}'] == "2"
    assert values['scoring_requests_total{route="/score",code="504"}'] == "1"
    assert values['scoring_request_errors_total{route="/score",reason="timeout"}'] == "1"
    assert values['scoring_request_duration_seconds_bucket{route="/score",le="0.00025"}'] == "1"
    assert values['scoring_request_duration_seconds_bucket{route="/score",le="0.005"}'] == "2"
    assert values['scoring_request_duration_seconds_bucket{route="/score",le="60"}'] == "2"
    assert values['scoring_request_duration_seconds_bucket{route="/score",le="+Inf"}'] == "3"
    assert values['scoring_request_duration_seconds_count{route="/score"}'] == "3"
    assert float(values['scoring_request_duration_seconds_sum{route="/score"}']) == 0.0002 + 0.003 + 61.0
    assert values['scoring_execution_provider_info{model="digits",provider="CPUExecutionProvider"}'] == "1"
    assert values["scoring_init_duration_seconds"] == "1.5"
    assert values["scoring_ready"] == "1"
    assert values["scoring_requests_in_flight"] == "2"
    assert values["scoring_inference_threads"] == "4"
    assert "# TYPE scoring_request_duration_seconds histogram" in text
    assert text.endswith("\n")


def test_buckets_start_at_a_quarter_millisecond_and_increase() -> None:
    assert LATENCY_BUCKETS[0] == 0.00025
    assert list(LATENCY_BUCKETS) == sorted(set(LATENCY_BUCKETS))


def test_label_values_are_escaped() -> None:
    m = Metrics()
    m.providers['we"ird\\name\n'] = "x"
    assert 'model="we\\"ird\\\\name\\n"' in m.render()


def test_merged_metrics_sum_counters_and_histograms() -> None:
    a, b = Metrics(), Metrics()
    a.observe("/score", 200, 0.0002)
    b.observe("/score", 200, 0.003)
    b.observe("/score", 400, 0.001)
    b.error("/score", "bad_request")
    a.in_flight, b.in_flight = 1, 2
    for m, seconds in ((a, 1.5), (b, 2.5)):
        m.ready = True
        m.init_seconds = seconds
        m.providers["digits"] = "CPUExecutionProvider"
        m.gauges["scoring_inference_threads"] = ("Worker threads.", lambda: 1)
    merged = merge_expositions([a.render(), b.render()])
    values = _lines(merged)
    assert values['scoring_requests_total{route="/score",code="200"}'] == "2"
    assert values['scoring_requests_total{route="/score",code="400"}'] == "1"
    assert values['scoring_request_errors_total{route="/score",reason="bad_request"}'] == "1"
    assert values['scoring_request_duration_seconds_bucket{route="/score",le="0.00025"}'] == "1"
    assert values['scoring_request_duration_seconds_bucket{route="/score",le="0.005"}'] == "3"
    assert values['scoring_request_duration_seconds_count{route="/score"}'] == "3"
    assert float(values['scoring_request_duration_seconds_sum{route="/score"}']) == pytest.approx(0.0042)
    assert values["scoring_requests_in_flight"] == "3"
    assert values["scoring_inference_threads"] == "2"
    assert values["scoring_ready"] == "1"
    assert values["scoring_init_duration_seconds"] == "2.5"
    assert values['scoring_execution_provider_info{model="digits",provider="CPUExecutionProvider"}'] == "1"
    assert merged.count("# TYPE scoring_requests_total counter") == 1


def test_merged_readiness_is_the_least_ready_worker() -> None:
    a, b = Metrics(), Metrics()
    a.ready = True
    assert _lines(merge_expositions([a.render(), b.render()]))["scoring_ready"] == "0"
    assert _lines(merge_expositions([a.render()]))["scoring_ready"] == "1"
