"""The tracing adapter (extproc/adapters/tracing.py) alone: what a request span records of a
client's path, a refused OTLP endpoint, and a shutdown that a hung collector cannot hold."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from extproc.adapters.tracing import OtelTracing, endpoint_problem
from mlproxy_kernel.outcome import Outcome


def test_a_request_span_keeps_the_path_without_its_query() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = OtelTracing(provider)
    span = tracing.start_request(
        {":path": "/v1/models/m:predict?api_key=SECRET123"},
        "p",
        "/v1/models/m:predict?api_key=SECRET123",
        "",
        0.0,
    )
    tracing.end_request(span, 200, Outcome.OK, 0.001, 0.002)
    [finished] = [s for s in exporter.get_finished_spans() if s.name == "mlproxy.request"]
    assert finished.attributes is not None
    assert finished.attributes["url.path"] == "/v1/models/m:predict"
    assert "SECRET" not in str(dict(finished.attributes))


@pytest.mark.parametrize(
    ("url", "refused"),
    [
        ("http://otel-collector:4318/v1/traces", False),
        ("https://otel.example.com/v1/traces", False),
        ("http://user:pass@otel:4318/v1/traces", True),
        ("http://otel:4318/v1/traces?token=SECRET", True),
        ("otel:4318", True),
        ("file:///tmp/x", True),
    ],
)
def test_an_endpoint_with_credentials_in_it_is_refused(url: str, refused: bool) -> None:
    problem = endpoint_problem(url)
    assert (problem is not None) == refused
    if problem:
        assert "SECRET" not in problem and url not in problem


class Hung(SpanExporter):
    """A collector that never answers."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.release.wait()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        self.release.wait()


def test_a_hung_collector_cannot_hold_the_shutdown(caplog: pytest.LogCaptureFixture) -> None:
    exporter = Hung()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = OtelTracing(provider)
    caplog.set_level(logging.WARNING, logger="extproc.adapters.tracing")
    try:
        tracing.shutdown(timeout=0.2)  # returns: pytest's timeout would fail a hang
        assert "not exported within" in caplog.text
    finally:
        exporter.release.set()


def test_mlproxy_extproc_refuses_such_an_endpoint_at_start(tmp_path: Path) -> None:
    import subprocess
    import sys

    policies = tmp_path / "p.yaml"
    policies.write_text("policies: []\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlproxy.cli",
            "extproc",
            "--policies",
            str(policies),
            "--port",
            "0",
            "--otlp-endpoint",
            "http://otel:4318/v1/traces?token=SECRET123",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "OTEL_EXPORTER_OTLP_HEADERS" in done.stderr and "SECRET123" not in done.stderr
