"""`mlproxy extproc --otlp-endpoint URL --log-format json` as operators run it: a separate
process behind the real Envoy, exporting spans with OTLP/HTTP to a collector in this test
(decoded with the OpenTelemetry protobuf classes), and logging JSON lines that name the batch
and the requests in it."""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from mlproxy.stack import Stack
from mlproxy_common import ports
from tests.e2e.conftest import echo_policy
from tests.servers import EchoBackend, ThreadedApp
from tests.waiting import eventually

pytestmark = pytest.mark.e2e


class Collector(ThreadedApp):
    """An OTLP/HTTP trace receiver: keeps every span's name, attributes and resource."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        super().__init__(app)

    async def _traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        with self._lock:
            for resource in export.resource_spans:
                res = {a.key: a.value.string_value for a in resource.resource.attributes}
                for scope in resource.scope_spans:
                    for span in scope.spans:
                        attrs = {
                            a.key: a.value.string_value or a.value.int_value
                            for a in span.attributes
                        }
                        self.spans.append({"name": span.name, "attributes": attrs, "resource": res})
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def names(self) -> list[str]:
        with self._lock:
            return [s["name"] for s in self.spans]


@pytest.fixture(scope="module")
def collector() -> Iterator[Collector]:
    server = Collector()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def observed(
    echo_backend: EchoBackend, collector: Collector, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    run_dir = tmp_path_factory.mktemp("observed")
    closed = f"http://127.0.0.1:{ports.reserve()}"
    policies = [
        echo_policy("seen", echo_backend.url, batching={"max_batch_size": 3, "max_wait_ms": 3000}),
        echo_policy("gone", closed, batching={"max_batch_size": 3, "max_wait_ms": 3000}),
    ]
    path = run_dir / "policies.json"
    path.write_text(json.dumps({"policies": policies}))
    stack = Stack(
        envoy_port=0,
        policies_file=path,
        run_dir=run_dir,
        extproc_env={
            "MLPROXY_OTLP_ENDPOINT": f"{collector.url}/v1/traces",
            "MLPROXY_LOG_FORMAT": "json",
            "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within 0.1 s (the SDK's default: 5 s)
        },
    )
    try:
        stack.start_child(stack.extproc_child(0, ["--policies", str(path)]))
        stack.model_port = echo_backend.port
        stack.start_envoy()
        yield stack
    finally:
        stack.stop()
        stack.release_ports()


def log_lines(stack: Stack) -> list[dict[str, Any]]:
    assert stack.run_dir is not None
    text = (stack.run_dir / "extproc-0.log").read_text()
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def send(stack: Stack, model: str, n: int) -> list[httpx.Response]:
    tag = os.urandom(3).hex()
    with httpx.Client(timeout=30) as client, concurrent.futures.ThreadPoolExecutor(n) as pool:
        return list(
            pool.map(
                lambda i: client.post(
                    f"{stack.envoy_url}/v1/models/{model}:predict",
                    json={"instances": [{"id": f"{tag}-{i}"}]},
                ),
                range(n),
            )
        )


def test_spans_reach_an_otlp_collector_from_the_cli(observed: Stack, collector: Collector) -> None:
    answers = send(observed, "seen", 3)
    assert [r.status_code for r in answers] == [200, 200, 200]
    eventually(
        lambda: (
            collector.names().count("mlproxy.request") >= 3 and "mlproxy.batch" in collector.names()
        ),
        30,
        lambda: f"the spans at the collector (there: {collector.names()})",
    )
    names = collector.names()
    assert names.count("mlproxy.request") >= 3 and names.count("mlproxy.queue") >= 3
    batch = next(s for s in collector.spans if s["name"] == "mlproxy.batch")
    assert batch["attributes"]["mlproxy_kernel.policy"] == "seen"
    assert batch["attributes"]["mlproxy.batch.requests"] == 3
    assert batch["resource"]["service.name"] == "mlproxy-extproc"
    assert batch["resource"]["service.instance.id"] == "extproc-0"
    lines = log_lines(observed)
    assert lines, "no JSON log line"
    assert any("tracing: spans exported with OTLP/HTTP" in d["message"] for d in lines)


def test_json_log_lines_name_the_batch_and_its_requests(observed: Stack) -> None:
    answers = send(observed, "gone", 3)
    assert [r.status_code for r in answers] == [502, 502, 502]

    def failed_lines() -> list[dict[str, Any]]:
        return [d for d in log_lines(observed) if "policy gone: backend" in d["message"]]

    eventually(failed_lines, 30, "the failed batch's log line")
    failed = failed_lines()
    assert len(failed) == 1, failed
    line = failed[0]
    assert line["level"] == "WARNING" and line["logger"] == "extproc.runtime.batcher"
    assert len(line["batch_id"]) == 16
    assert len(line["request_ids"]) == 3 and len(set(line["request_ids"])) == 3
    assert "request_id" not in line  # a batch's line: no one request's id
    for d in log_lines(observed):  # every line of the process is JSON with the four fields
        assert {"time", "level", "logger", "message"} <= set(d)
