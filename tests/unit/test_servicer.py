"""The ext_proc servicer on fake streams: no gRPC, no sockets, no sleeps. Each stream is a
list of Envoy's messages and what the servicer wrote back; the backend is the in-memory echo
model (tests/fakes.py). The same paths as tests/integration/test_grpc_server.py, which runs
them through real gRPC."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from extproc.adapters.servicer import ExtProcServicer
from extproc.core.clock import MonotonicClock
from extproc.runtime.executor import BatchExecutor
from extproc.runtime.pool import BatcherPool
from mlproxy_kernel.policy import Router, parse_policies
from tests.fakes import (
    FakeBackend,
    FakeStream,
    RecordingMetrics,
    body_msg,
    forwarded_headers_msg,
    headers_msg,
)
from tests.waiting import eventually_async


class Stream(FakeStream):
    """One ext_proc stream: Envoy's messages in, the servicer's answers out. `gate`: the body
    is read only once it is set (a client slow to send it)."""

    def __init__(self, *messages: bytes, gate: asyncio.Event | None = None) -> None:
        super().__init__(*messages)
        self.gate = gate

    async def read(self) -> Any:
        if len(self.out) == 1 and self.gate is not None:
            await self.gate.wait()
        return await super().read()

    def answer(self) -> tuple[int, Any]:
        """The ImmediateResponse: its status and JSON body."""
        immediate = self.out[-1].immediate_response
        return int(immediate.status.code), json.loads(immediate.body)


class Harness:
    def __init__(self, **batching: Any) -> None:
        policies = parse_policies(
            {
                "policies": [
                    {
                        "name": "echo",
                        "match": {"path": "/v1/models/{model}:predict"},
                        "backend": {"url": "http://backend/v1/models/{model}:predict"},
                        "batching": {"max_batch_size": 4, "max_wait_ms": 60_000, **batching},
                    }
                ]
            }
        )
        clock = MonotonicClock()
        self.backend = FakeBackend()
        self.metrics = RecordingMetrics()
        self.pool = BatcherPool(
            BatchExecutor(self.backend, self.metrics, clock), clock, self.metrics
        )
        self.pool.update_policies(policies)
        self.servicer = ExtProcServicer(Router(policies), self.pool, self.metrics)

    async def run(self, *streams: Stream) -> None:
        await asyncio.gather(*(self.servicer.process(None, s) for s in streams))


PATH = "/v1/models/m:predict"


async def test_a_full_batch_answers_each_stream_with_its_own_prediction() -> None:
    h = Harness()
    streams = [Stream(headers_msg(PATH), body_msg({"instances": [i]})) for i in range(4)]
    await h.run(*streams)
    assert h.backend.calls == [[0, 1, 2, 3]]  # one batch
    for i, s in enumerate(streams):
        assert len(s.out) == 2  # the headers' answer, then the request's own
        assert s.answer() == (200, {"predictions": [{"echo": i}]})


async def test_a_path_without_a_policy_continues_and_skips_its_body() -> None:
    h = Harness()
    s = Stream(headers_msg("/healthz"), body_msg({"instances": [1]}))
    await h.run(s)
    assert len(s.out) == 1 and s.out[0].request_headers is not None
    assert s.out[0].mode_override.request_body_mode == 0  # NONE: no body for ext_proc
    assert h.backend.calls == []


async def test_without_pseudo_headers_the_request_line_comes_from_envoys_attributes() -> None:
    """Envoy with forward_rules (every shipped config) sends no :path nor :method."""
    h = Harness(max_batch_size=2)
    line = {"request.path": PATH, "request.method": "POST"}
    streams = [
        Stream(forwarded_headers_msg(line, content_length="20"), body_msg({"instances": [i]}))
        for i in range(2)
    ]
    get = Stream(forwarded_headers_msg({**line, "request.method": "GET"}, eos=True))
    other = Stream(forwarded_headers_msg({**line, "request.path": "/healthz"}))
    await h.run(*streams, get, other)
    assert h.backend.calls == [[0, 1]]
    for i, s in enumerate(streams):
        assert s.answer() == (200, {"predictions": [{"echo": i}]})
    for s in (get, other):  # not for a policy: on to the upstream untouched
        assert len(s.out) == 1 and s.out[0].request_headers is not None
        assert s.out[0].mode_override.request_body_mode == 0


async def test_neither_a_path_header_nor_attribute_goes_on_untouched_and_says_why(
    caplog: Any,
) -> None:
    h = Harness()
    s = Stream(
        forwarded_headers_msg({"source.address": "10.0.0.1:5"}), body_msg({"instances": [1]})
    )
    await h.run(s)
    assert len(s.out) == 1 and s.out[0].request_headers is not None
    assert h.backend.calls == []
    assert "add request.path and request.method to the ext_proc filter's" in caplog.text


async def test_a_connect_has_no_path_and_goes_on_untouched_without_a_warning(
    caplog: Any,
) -> None:
    """Red team 26 F2: any client's CONNECT made ext_proc say the config lacked request.path."""
    h = Harness()
    s = Stream(forwarded_headers_msg({"request.method": "CONNECT"}))
    await h.run(s)
    assert len(s.out) == 1 and s.out[0].request_headers is not None
    assert "request_attributes" not in caplog.text


async def test_a_path_without_a_method_goes_on_untouched_and_says_why(caplog: Any) -> None:
    """Red team 26 F3: a config with request.path and not request.method batched a PUT as a
    POST."""
    h = Harness()
    s = Stream(forwarded_headers_msg({"request.path": PATH}), body_msg({"instances": [1]}))
    await h.run(s)
    assert len(s.out) == 1 and s.out[0].request_headers is not None
    assert h.backend.calls == []
    assert "add request.path and request.method to the ext_proc filter's" in caplog.text


async def test_a_request_line_that_is_not_utf8_is_batched_as_its_path_says() -> None:
    """Red team 26 F1: Envoy passes an HTTP/2 query string on as it came, in the request.path
    attribute (a protobuf string): a byte that is not UTF-8 failed the whole message, and the
    stream was aborted (500, or with fail-open the request bypassed MLProxy)."""
    h = Harness(max_batch_size=2)
    line = {"request.path": PATH + "?q=AB", "request.method": "POST"}
    raw = forwarded_headers_msg(line, content_length="20")
    bad = raw.replace(b"?q=AB", b"?q=\xff\xfe")
    assert bad != raw
    streams = [
        Stream(bad, body_msg({"instances": [0]})),
        Stream(forwarded_headers_msg(line), body_msg({"instances": [1]})),
    ]
    await h.run(*streams)
    assert h.backend.calls == [[0, 1]]
    for i, s in enumerate(streams):
        assert s.answer() == (200, {"predictions": [{"echo": i}]})


async def test_a_bad_body_fails_alone_and_its_batch_goes_on_without_it() -> None:
    h = Harness(max_batch_size=3)
    good = [Stream(headers_msg(PATH), body_msg({"instances": [i]})) for i in range(3)]
    bad = Stream(headers_msg(PATH), body_msg(b"{not json"))
    await h.run(good[0], bad, good[1], good[2])
    status, doc = bad.answer()
    assert status == 400 and list(doc) == ["error"]
    assert [g.answer() for g in good] == [(200, {"predictions": [{"echo": i}]}) for i in range(3)]
    assert h.backend.calls == [[0, 1, 2]]


async def test_a_content_length_that_is_not_digits_is_400_and_the_batch_goes_on() -> None:
    """Envoy forwards only 1*DIGIT; a direct gRPC peer could send what int() would take."""
    odd = ["-5", "+5", "1_0", "\u0661\u0662", " 5", "5 ", "", "0x10", "9" * 19, "9" * 5000]
    h = Harness(max_batch_size=2)
    good = [Stream(headers_msg(PATH), body_msg({"instances": [i]})) for i in range(2)]
    bad = [
        Stream(headers_msg(PATH, **{"content-length": value}), body_msg({"instances": [9]}))
        for value in odd
    ]
    await h.run(good[0], *bad, good[1])
    for value, s in zip(odd, bad, strict=True):
        status, doc = s.answer()
        if value.isascii() and value.isdigit():  # digits, more than any limit
            assert status == 413 and "999999999999999999..." in doc["error"], value[:20]
        else:
            assert status == 400 and "content-length" in doc["error"], value
    assert [g.answer() for g in good] == [(200, {"predictions": [{"echo": i}]}) for i in range(2)]
    assert h.backend.calls == [[0, 1]]


async def test_a_content_length_with_leading_zeros_is_its_number() -> None:
    """HTTP's 1*DIGIT may start with zeros, and Envoy forwards them (red team 31)."""
    h = Harness(max_batch_size=2)
    body = body_msg({"instances": [0]})
    padded = [
        Stream(headers_msg(PATH, **{"content-length": "0" * n + "18"}), body) for n in (1, 30)
    ]
    await h.run(*padded)
    assert [s.answer() for s in padded] == [(200, {"predictions": [{"echo": 0}]})] * 2


async def test_a_post_without_a_body_is_400_and_nothing_is_queued() -> None:
    h = Harness()
    s = Stream(headers_msg(PATH, eos=True))
    await h.run(s)
    assert s.answer()[0] == 400
    assert h.backend.calls == []


async def test_a_client_gone_before_its_batch_leaves_is_withdrawn() -> None:
    """Two of a batch of three are queued; one client goes away; two more arrive: the batch
    that leaves holds the three that stayed, never the one that went."""
    h = Harness(max_batch_size=3)
    stays = Stream(headers_msg(PATH), body_msg({"instances": ["stays"]}))
    leaves = Stream(headers_msg(PATH), body_msg({"instances": ["leaves"]}))
    first = asyncio.create_task(h.servicer.process(None, stays))
    gone = asyncio.create_task(h.servicer.process(None, leaves))
    for _ in range(20):  # event loop turns (no timed sleep): until both are queued
        await asyncio.sleep(0)
    assert len(stays.out) == len(leaves.out) == 1 and h.backend.calls == []
    gone.cancel()
    await asyncio.gather(gone, return_exceptions=True)
    late = [Stream(headers_msg(PATH), body_msg({"instances": [f"late-{i}"]})) for i in range(2)]
    await h.run(*late)
    await first
    assert h.backend.calls == [["stays", "late-0", "late-1"]]
    assert stays.answer()[1] == {"predictions": [{"echo": "stays"}]}
    assert [s.answer()[1] for s in late] == [
        {"predictions": [{"echo": f"late-{i}"}]} for i in range(2)
    ]
    assert len(leaves.out) == 1  # nothing more was written to the stream that went away


async def test_a_stream_that_ends_after_its_headers_queues_nothing() -> None:
    h = Harness()
    s = Stream(headers_msg(PATH))  # Envoy's stream ends before the body
    await h.run(s)
    assert len(s.out) == 1  # the headers' answer only
    assert h.backend.calls == []


async def test_a_body_that_does_not_come_in_time_is_answered_408(monkeypatch: Any) -> None:
    from extproc.adapters import servicer

    monkeypatch.setattr(servicer, "BODY_WAIT_FLOOR_S", 0.01)
    h = Harness()
    s = Stream(
        headers_msg(PATH, **{"x-mlproxy-deadline-ms": "20"}),
        body_msg({"instances": [1]}),
        gate=asyncio.Event(),  # never set: the body never comes
    )
    await h.run(s)
    status, doc = s.answer()
    assert status == 408 and "did not arrive within 20 ms" in doc["error"]
    assert h.metrics.requests == [("echo", "body_timeout")]
    assert h.backend.calls == []


async def test_only_late_bodies_are_cut_off_and_the_sweep_stops_when_none_waits(
    monkeypatch: Any,
) -> None:
    """One timer checks every stream waiting for its body (BodyWaits): a late one is answered
    408, one whose body comes in its own time is served, and no timer is left behind."""
    from extproc.adapters import servicer

    monkeypatch.setattr(servicer, "BODY_WAIT_FLOOR_S", 0.01)
    h = Harness(max_batch_size=1)
    late = Stream(
        headers_msg(PATH, **{"x-mlproxy-deadline-ms": "20"}),
        body_msg({"instances": [1]}),
        gate=asyncio.Event(),  # never set
    )
    gate = asyncio.Event()
    patient = Stream(
        headers_msg(PATH, **{"x-mlproxy-deadline-ms": "2000"}),
        body_msg({"instances": [2]}),
        gate=gate,
    )
    tasks = [asyncio.ensure_future(h.run(s)) for s in (late, patient)]
    await eventually_async(lambda: len(late.out) == 2, 5, "the late stream's answer")
    assert late.answer()[0] == 408
    gate.set()  # the patient stream's body comes after the other was cut off
    await asyncio.gather(*tasks)
    status, doc = patient.answer()
    assert status == 200 and doc == {"predictions": [{"echo": 2}]}
    waits = h.servicer._body_waits
    await eventually_async(lambda: waits._timer is None, 5, "the sweep to stop")
    assert not waits._due and not waits._late


async def test_a_client_gone_while_its_body_is_awaited_cancels_only_its_stream() -> None:
    h = Harness(max_batch_size=1)
    slow = Stream(headers_msg(PATH), body_msg({"instances": [1]}), gate=asyncio.Event())
    task = asyncio.ensure_future(h.servicer.process(None, slow))
    await eventually_async(lambda: len(slow.out) == 1, 5, "the headers' answer")
    task.cancel()
    try:
        await task
        raise AssertionError("the handler was not cancelled")
    except asyncio.CancelledError:
        pass
    assert len(slow.out) == 1  # the headers' answer only
    other = Stream(headers_msg(PATH), body_msg({"instances": [2]}))
    await h.run(other)
    assert other.answer() == (200, {"predictions": [{"echo": 2}]})
