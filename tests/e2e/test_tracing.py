"""OpenTelemetry tracing through the real Envoy: an ext_proc server in this process with the
SDK's in-memory exporter, Envoy in front of it, the echo backend behind it. Each request's
span continues the client's trace, has its queue wait as a child and links to its batch's
span; each batch's span links to exactly the requests in it, and the backend receives that
batch's traceparent, never a client's trace context."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from extproc.adapters.tracing import OtelTracing
from extproc.main import ExtProcServer
from mlproxy.stack import Stack
from mlproxy_kernel.policy import Policy
from tests.e2e.conftest import echo_policy
from tests.servers import EchoBackend

pytestmark = pytest.mark.e2e

BATCH = 4


@pytest.fixture
async def traced(
    echo_backend: EchoBackend, tmp_path: Path
) -> AsyncIterator[tuple[Stack, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    policy = Policy.model_validate(
        echo_policy(
            "traced",
            echo_backend.url,
            batching={"max_batch_size": BATCH, "max_wait_ms": 5_000},
        )
    )
    stack = Stack(envoy_port=0, policies_file=tmp_path / "unused.json", run_dir=tmp_path)
    server = ExtProcServer([policy], port=stack.extproc_ports[0], tracing=OtelTracing(provider))
    await server.start()
    try:
        stack.model_port = echo_backend.port
        await asyncio.to_thread(stack.start_envoy)
        yield stack, exporter
    finally:
        await asyncio.to_thread(stack.stop)
        await server.stop(grace=1)
        stack.release_ports()


def hex_trace(i: int) -> str:
    return f"{0xABC0000 + i:032x}"


def hex_parent(i: int) -> str:
    return f"{0xDEF000 + i:016x}"


async def post(
    session: aiohttp.ClientSession, url: str, ident: str, headers: dict[str, str]
) -> dict[str, Any]:
    async with session.post(
        f"{url}/v1/models/traced:predict",
        json={"instances": [{"id": ident}]},
        headers=headers,
    ) as resp:
        assert resp.status == 200, await resp.text()
        doc: dict[str, Any] = await resp.json()
        return doc


def spans_named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def test_a_request_span_continues_the_clients_trace_and_links_to_its_batch(
    traced: tuple[Stack, InMemorySpanExporter], echo_backend: EchoBackend
) -> None:
    stack, exporter = traced
    n = 2 * BATCH
    tag = os.urandom(4).hex()
    ids = [f"{tag}-{i}" for i in range(n)]
    async with aiohttp.ClientSession() as session:
        answers = await asyncio.gather(
            *(
                post(
                    session,
                    stack.envoy_url,
                    ids[i],
                    {
                        "traceparent": f"00-{hex_trace(i)}-{hex_parent(i)}-01",
                        "tracestate": f"client=secret{i}",
                        "x-request-id": f"rid-{tag}-{i}",
                    },
                )
                for i in range(n)
            )
        )
    for i, doc in enumerate(answers):
        assert doc["predictions"] == [{"echo": ids[i]}]

    requests = spans_named(exporter, "mlproxy.request")
    queues = spans_named(exporter, "mlproxy.queue")
    batches = spans_named(exporter, "mlproxy.batch")
    assert len(requests) == n and len(queues) == n and len(batches) == 2

    by_trace = {f"{s.context.trace_id:032x}": s for s in requests}
    assert sorted(by_trace) == sorted(hex_trace(i) for i in range(n))
    request_of: dict[int, ReadableSpan] = {}
    for i in range(n):
        span = by_trace[hex_trace(i)]
        assert span.kind == SpanKind.SERVER
        assert span.parent is not None and f"{span.parent.span_id:016x}" == hex_parent(i)
        assert span.attributes is not None
        # Envoy's own x-request-id (it replaces a client's unless preserve_external_request_id)
        assert re.fullmatch(r"[0-9a-f-]{36}", str(span.attributes["mlproxy.request_id"]))
        assert span.attributes["mlproxy.batch_size"] == BATCH
        assert span.attributes["http.response.status_code"] == 200
        assert span.attributes["mlproxy.queue_ms"] >= 0
        request_of[span.context.span_id] = span

    for queue in queues:  # each the child of one request span, within it
        assert queue.parent is not None and queue.parent.span_id in request_of
        parent = request_of[queue.parent.span_id]
        assert queue.context.trace_id == parent.context.trace_id
        assert queue.start_time is not None and queue.end_time is not None
        assert parent.start_time is not None and parent.end_time is not None
        assert parent.start_time <= queue.start_time <= queue.end_time <= parent.end_time

    assert len({s.attributes["mlproxy.request_id"] for s in requests if s.attributes}) == n
    client_traces = {s.context.trace_id for s in requests}
    sent = {
        h["traceparent"][:-3]: (batch, int(h["traceparent"][-2:], 16))
        for batch, h in zip(echo_backend.batches, echo_backend.headers, strict=True)
        if any(isinstance(i, str) and i.startswith(tag) for i in batch)
    }
    assert len(sent) == 2
    for batch in batches:
        assert batch.kind == SpanKind.CLIENT and batch.parent is None
        assert batch.context.trace_id not in client_traces  # a batch is no client's
        members = {link.context.span_id for link in batch.links}
        assert len(members) == BATCH and members <= set(request_of)
        assert batch.attributes is not None
        for span_id in members:  # and each of them links back to this batch
            member = request_of[span_id]
            assert member.attributes is not None
            assert member.attributes["mlproxy.batch_id"] == batch.attributes["mlproxy.batch_id"]
            assert [link.context.span_id for link in member.links] == [batch.context.span_id]
        # the backend got this batch's traceparent, with exactly these requests' instances
        header = f"00-{batch.context.trace_id:032x}-{batch.context.span_id:016x}"
        assert header in sent
        instances, flags = sent[header]
        assert flags & 1  # sampled
        trace_of = {f"{request_of[m].context.trace_id:032x}" for m in members}
        expected = {ids[i] for i in range(n) if hex_trace(i) in trace_of}
        assert set(instances) == expected
    for headers in echo_backend.headers:  # no client's trace context ever reaches it
        assert "secret" not in headers.get("tracestate", "")
        assert not any(hex_trace(i) in headers.get("traceparent", "") for i in range(n))


async def test_a_request_without_a_trace_starts_one_and_a_broken_traceparent_is_ignored(
    traced: tuple[Stack, InMemorySpanExporter],
) -> None:
    stack, exporter = traced
    tag = os.urandom(4).hex()
    hostile = [
        {},
        {"traceparent": "00-" + "0" * 32 + "-" + "1" * 16 + "-01"},  # all-zero trace id
        {"traceparent": "garbage-!", "tracestate": "x=" + "y" * 10_000},
        {"traceparent": "ff-" + "a" * 32 + "-" + "b" * 16 + "-01"},  # version ff: invalid
    ]
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(
            *(post(session, stack.envoy_url, f"{tag}-{i}", h) for i, h in enumerate(hostile))
        )
    requests = spans_named(exporter, "mlproxy.request")
    assert len(requests) == len(hostile)
    for span in requests:
        assert span.parent is None  # a new trace, not the broken one
        assert span.context.trace_id != 0
        assert span.context.trace_id != int("a" * 32, 16)
    assert len(spans_named(exporter, "mlproxy.batch")) == 1
