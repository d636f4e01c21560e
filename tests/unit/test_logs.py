"""Structured logs (mlproxy_common/logs.py): the JSON and text formats, the request and batch ids a
line carries, and that a batch's lines name its own requests, never another's."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from extproc.codecs import get_codec
from extproc.core.clock import MonotonicClock
from extproc.runtime.executor import BatchExecutor
from extproc.runtime.pool import BatcherPool
from extproc.runtime.ports import RequestContext
from extproc.runtime.replies import Reply
from mlproxy_common.logs import (
    REQUEST_ID,
    ContextFilter,
    JsonFormatter,
    TextFormatter,
    request_id,
)
from mlproxy_kernel.policy import Policy, Router
from tests.fakes import FakeBackend, RecordingMetrics


def record(message: str = "hello %s", *args: Any, **attrs: Any) -> logging.LogRecord:
    rec = logging.LogRecord("mlproxy.test", logging.WARNING, __file__, 1, message, args, None)
    for k, v in attrs.items():
        setattr(rec, k, v)
    return rec


def test_json_lines_carry_the_fields_and_the_ids() -> None:
    line = JsonFormatter("worker-1").format(
        record("batch of %d", 3, request_id="r-1", batch_id="ab12", request_ids=("r-1", "", "r-3"))
    )
    doc = json.loads(line)
    assert "\n" not in line
    assert doc["level"] == "WARNING" and doc["logger"] == "mlproxy.test"
    assert doc["message"] == "batch of 3" and doc["process"] == "worker-1"
    assert doc["request_id"] == "r-1" and doc["batch_id"] == "ab12"
    assert doc["request_ids"] == ["r-1", "r-3"]  # requests without an id are left out
    assert doc["time"].endswith("+00:00") and "T" in doc["time"]
    plain = json.loads(JsonFormatter().format(record("no ids")))
    assert set(plain) == {"time", "level", "logger", "message"}


def test_json_lines_hold_a_traceback_and_an_audit_record_as_fields() -> None:
    try:
        raise ValueError("boom\nsecond line")
    except ValueError:
        import sys

        rec = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(rec)
    assert len(line.splitlines()) == 1
    assert "ValueError: boom\nsecond line" in json.loads(line)["exception"]
    audit = {"event": "policy.put", "status": 200, "token": "ci"}
    doc = json.loads(JsonFormatter().format(record(json.dumps(audit), audit=audit)))
    assert doc["audit"] == audit


def test_text_lines_name_the_ids_after_the_message_before_a_traceback() -> None:
    text = TextFormatter().format(record("slow", request_id="r-9", batch_id="cafe"))
    assert text.endswith(" mlproxy.test WARNING slow [request=r-9 batch=cafe]")
    many = TextFormatter().format(record("x", batch_id="b", request_ids=("a", "c")))
    assert many.endswith("x [batch=b requests=a,c]")
    assert TextFormatter().format(record("plain")).endswith("WARNING plain")


@pytest.mark.parametrize(
    ("header", "kept"),
    [
        ("3f1c9a5e-77b0-4a5e-9a43-3d1f0a0c2b11", True),
        ("req:7/part+1=ok", True),
        ("a" * 128, True),
        ("a" * 129, False),
        ("two\nlines", False),
        ("with space", False),
        ('quote"s', False),
        ("\u202eevil", False),
        ("", False),
        (None, False),
    ],
)
def test_a_request_id_is_logged_only_if_it_is_a_plain_token(header: str | None, kept: bool) -> None:
    assert request_id(header) == (header if kept else "")


@pytest.fixture
def captured() -> Iterator[list[logging.LogRecord]]:
    """Records of the `extproc` loggers, through the ids filter, as the CLI's handler has it."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, rec: logging.LogRecord) -> None:
            records.append(rec)

    handler = Keep()
    handler.addFilter(ContextFilter())
    logger = logging.getLogger("extproc")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


POLICY = Policy.model_validate(
    {
        "name": "echo",
        "match": {"path": "/v1/models/{model}:predict"},
        "backend": {"url": "http://backend/v1/models/{model}:predict"},
        "batching": {"max_batch_size": 3, "max_wait_ms": 60_000, "max_in_flight": 4},
    }
)


async def test_a_batch_logs_its_own_id_and_its_requests_ids_not_the_submitters(
    captured: list[logging.LogRecord],
) -> None:
    """Two full batches against a backend that is down: each warning names its batch and
    exactly the three requests in it, and not the request id of the task that filled it."""
    backend = FakeBackend(down=True)
    clock = MonotonicClock()
    pool = BatcherPool(BatchExecutor(backend, RecordingMetrics(), clock), clock, RecordingMetrics())
    route = Router([POLICY]).resolve("/v1/models/m:predict")
    assert route is not None
    codec = get_codec("kserve-v1")
    futures: list[asyncio.Future[Reply]] = []
    tickets = []

    async def submit(i: int) -> None:
        REQUEST_ID.set(f"req-{i}")  # as the servicer sets it in the request's own task
        fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        body = json.dumps({"instances": [[i]]}).encode()
        context = RequestContext(f"req-{i}")
        tickets.append(pool.submit(route, codec.parse(body), fut, context=context))
        futures.append(fut)

    for i in range(6):
        await asyncio.create_task(submit(i))
    replies = await asyncio.gather(*futures)
    assert all(r.status == 502 for r in replies)
    warnings = [r for r in captured if "unreachable" in r.getMessage()]
    assert len(warnings) == 2
    batches = {tuple(r.request_ids) for r in warnings}
    assert batches == {("req-0", "req-1", "req-2"), ("req-3", "req-4", "req-5")}
    assert all(not hasattr(r, "request_id") for r in warnings)  # no submitter's id
    ids = {r.batch_id for r in warnings}
    assert len(ids) == 2 and all(len(i) == 16 for i in ids)
    assert {t.batch_id for t in tickets} == ids
