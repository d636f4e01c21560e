"""PrometheusMetrics looks each policy's series up once; what it exports must not change."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from extproc.adapters.metrics import PrometheusMetrics
from mlproxy_kernel.outcome import Outcome


def value(m: PrometheusMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def test_cached_series_count_per_policy_and_label() -> None:
    m = PrometheusMetrics(CollectorRegistry())
    for policy in ("a", "b", "a"):
        m.request_done(policy, Outcome.OK, 0.001)
        m.request_answered(policy, 0.01, missed=policy == "b")
        m.batch_done(policy, 3, 2, 0.004, Outcome.OK)
        m.batch_sent(policy, "full", 2)
        m.queue_depth(policy, 1)
    m.request_done("a", Outcome.BAD_REQUEST, None)
    m.batch_done("a", 1, 1, 0.5, Outcome.BACKEND_ERROR)
    m.batch_sent("a", "wait", 3)
    assert value(m, "mlproxy_requests_total", policy="a", outcome="ok") == 2
    assert value(m, "mlproxy_requests_total", policy="a", outcome="bad_request") == 1
    assert value(m, "mlproxy_requests_total", policy="b", outcome="ok") == 1
    assert value(m, "mlproxy_sla_misses_total", policy="b") == 1
    assert value(m, "mlproxy_sla_misses_total", policy="a") is None
    assert value(m, "mlproxy_batch_size_count", policy="a") == 3
    assert value(m, "mlproxy_backend_latency_seconds_count", policy="a", outcome="ok") == 2
    assert (
        value(m, "mlproxy_backend_latency_seconds_count", policy="a", outcome="backend_error") == 1
    )
    assert value(m, "mlproxy_batches_sent_total", policy="a", reason="wait") == 1
    assert value(m, "mlproxy_in_flight_limit", policy="a") == 3
    assert value(m, "mlproxy_queue_depth", policy="a") == 2


def test_a_removed_policy_that_returns_exports_its_allowance_again() -> None:
    m = PrometheusMetrics(CollectorRegistry())
    m.outside_allowance("p", 0.004)
    assert value(m, "mlproxy_outside_allowance_seconds", policy="p") == 0.004
    m.policy_removed("p")
    assert value(m, "mlproxy_outside_allowance_seconds", policy="p") is None
    m.outside_allowance("p", 0.006)  # the policy is back (or a request of it still finishes)
    assert value(m, "mlproxy_outside_allowance_seconds", policy="p") == 0.006
