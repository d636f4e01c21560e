"""Hostile peers on ext_proc's gRPC port, against the real server: header caps, the receive
limit, protocol breaks. Each time a well-behaved stream through the same server still gets its
own right answer, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy_data_plane.envoy.service.ext_proc import v3 as ep

from extproc.adapters import wire
from extproc.main import ExtProcServer, StreamLimits
from tests.integration.test_grpc_server import METHOD, body_msg, headers_msg, infer, policies
from tests.servers import EchoBackend

PATH = "/v1/models/m:predict"
OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", -1)]


def _len(number: int, payload: bytes) -> bytes:
    return wire._len_field(number, payload)


def raw_header(key: str, value: bytes) -> bytes:
    """One HeaderValue{key, raw_value} inside HeaderMap.headers, as Envoy encodes it."""
    return _len(1, _len(1, key.encode()) + _len(3, value))


def raw_headers_msg(entries: bytes) -> bytes:
    """ProcessingRequest{request_headers: HttpHeaders{headers: HeaderMap{entries}}}."""
    return _len(2, _len(1, entries))


ROUTED = raw_header(":path", PATH.encode()) + raw_header(":method", b"POST")


@pytest.fixture
async def server(echo_backend: EchoBackend) -> AsyncIterator[ExtProcServer]:
    srv = ExtProcServer(policies(echo_backend.url), port=0, metrics_port=0)
    await srv.start()
    yield srv
    await srv.stop(grace=2)


@pytest.fixture
async def channels(server: ExtProcServer) -> AsyncIterator[tuple[grpc.aio.Channel, ...]]:
    """Two connections to the server: one for the hostile peer, one for a good client."""
    target = f"127.0.0.1:{server.port}"
    async with (
        grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as bad,
        grpc.aio.insecure_channel(target, options=OWN_CONNECTION) as good,
    ):
        yield bad, good


async def exchange(channel: grpc.aio.Channel, *messages: bytes) -> tuple[list[bytes], Any]:
    """Send `messages` on one stream and half-close; the answers and the final status."""
    call = channel.stream_stream(METHOD)()
    answers: list[bytes] = []
    try:
        for m in messages:
            await call.write(m)
        await call.done_writing()
        while (got := await asyncio.wait_for(call.read(), 120)) is not grpc.aio.EOF:
            answers.append(got)
    except grpc.aio.AioRpcError as err:
        return answers, err.code()
    return answers, await call.code()


def immediate(raw: bytes) -> ep.ImmediateResponse:
    resp = ep.ProcessingResponse.parse(raw).immediate_response
    assert resp is not None
    return resp


async def good_request(channel: grpc.aio.Channel, ident: str) -> None:
    r = await infer(channel, {"instances": [{"id": ident}]})
    assert r.status is not None and r.status.code == 200
    assert json.loads(r.body) == {"predictions": [{"echo": ident}]}


async def while_hostile(good: grpc.aio.Channel, hostile: Any) -> Any:
    """Run the hostile exchange while good requests go through the same server: each good
    one gets its own answer, during and after."""
    attack = asyncio.ensure_future(hostile)
    i = 0
    while not attack.done() or i == 0:
        await good_request(good, f"good-{i}")
        i += 1
    await good_request(good, "after")
    return await attack


def refused(server: ExtProcServer, reason: str) -> float:
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for line in text.splitlines():
        if line.startswith(f'mlproxy_refused_streams_total{{reason="{reason}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_huge_message_of_two_million_headers_is_refused_by_the_receive_limit(
    server: ExtProcServer, channels: tuple[grpc.aio.Channel, ...]
) -> None:
    """The finding: 2,000,000 headers in one 14 MB message kept the event loop busy for
    seconds. It is now over the gRPC receive limit (the largest body plus framing): refused
    by grpcio before Python sees it."""
    bad, good = channels
    flood = raw_headers_msg(ROUTED + raw_header("a", b"") * 2_000_000)
    assert len(flood) > server.limits.max_body_bytes + 64 * 1024
    answers, code = await while_hostile(good, exchange(bad, flood))
    assert (answers, code) == ([], grpc.StatusCode.RESOURCE_EXHAUSTED)


@pytest.mark.parametrize(
    ("entries", "what"),
    [
        (ROUTED + raw_header("a", b"") * 550_000, "request headers take"),
        (ROUTED + raw_header("x", b"v" * 4_000_000), "request headers take"),
        (ROUTED + raw_header("a", b"") * 127, "more than 128 request headers"),
        (ROUTED + raw_header("x", b"v" * 32_800) * 2, "larger than 65536 bytes"),
    ],
    ids=["550k-headers", "one-4MB-value", "129-headers", "65.6KB-of-values"],
)
async def test_headers_over_the_caps_are_answered_431_without_decoding_them_all(
    server: ExtProcServer, channels: tuple[grpc.aio.Channel, ...], entries: bytes, what: str
) -> None:
    bad, good = channels
    message = raw_headers_msg(entries)
    before = refused(server, "header_limit")
    answers, code = await while_hostile(good, exchange(bad, message))
    assert code == grpc.StatusCode.OK and len(answers) == 1
    r = immediate(answers[0])
    assert r.status is not None and r.status.code == 431
    assert what in json.loads(r.body)["error"]
    assert refused(server, "header_limit") == before + 1


async def test_headers_at_the_caps_are_served(
    channels: tuple[grpc.aio.Channel, ...],
) -> None:
    """128 headers, 65536 bytes of names and values: exactly the default caps."""
    _, good = channels
    fixed = len(":path") + len(PATH) + len(":method") + len("POST") + len("content-type")
    fixed += len("application/json")
    filler = [(f"x-{i:03}", b"") for i in range(124)]
    used = fixed + sum(len(k) for k, _ in filler)
    filler.append(("x-big", b"v" * (65536 - used - len("x-big"))))
    entries = ROUTED + raw_header("content-type", b"application/json")
    entries += b"".join(raw_header(k, v) for k, v in filler)
    call = good.stream_stream(METHOD)()
    await call.write(raw_headers_msg(entries))
    assert await call.read() == wire.HEADERS_CONTINUE
    await call.write(body_msg({"instances": [{"id": "at-caps"}]}))
    r = immediate(await call.read())
    assert r.status is not None and r.status.code == 200
    assert json.loads(r.body) == {"predictions": [{"echo": "at-caps"}]}


GOOD_HEADERS = headers_msg(PATH)
# ProcessingRequest.attributes: one group of 290,000 string values (4.2 MB).
ATTRIBUTE_FLOOD = _len(
    9,
    _len(1, b"envoy.filters.http.ext_proc")
    + _len(2, _len(1, _len(1, b"k") + _len(2, _len(3, b"x"))) * 290_000),
)


@pytest.mark.parametrize(
    ("messages", "reason"),
    [
        ([random.Random(1).randbytes(3_000_000)], "malformed"),
        ([b"\x08\x00" * 1_500_000], "malformed"),  # 1.5 million tiny fields
        ([body_msg({"instances": [1]})], "protocol"),
        ([GOOD_HEADERS, GOOD_HEADERS], "protocol"),
        ([GOOD_HEADERS, b"\xff\xff\xff"], "malformed"),
        ([GOOD_HEADERS, raw_headers_msg(raw_header("a", b"") * 200)], "protocol"),
        # red team 9: 290k request attributes beside routed headers (decoded and walked for
        # 0.4 s, then served)
        ([raw_headers_msg(ROUTED) + ATTRIBUTE_FLOOD], "malformed"),
    ],
    ids=[
        "garbage",
        "tiny-fields",
        "body-first",
        "second-headers",
        "garbage-for-body",
        "flood-for-body",
        "attribute-flood",
    ],
)
async def test_a_stream_that_breaks_the_protocol_is_closed_at_once(
    server: ExtProcServer,
    channels: tuple[grpc.aio.Channel, ...],
    messages: list[bytes],
    reason: str,
) -> None:
    bad, good = channels
    before = refused(server, reason)
    answers, code = await while_hostile(good, exchange(bad, *messages))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert answers in ([], [wire.HEADERS_CONTINUE])  # nothing but the headers' continue
    assert refused(server, reason) == before + 1


async def test_messages_after_the_final_answer_are_not_read(
    channels: tuple[grpc.aio.Channel, ...],
) -> None:
    bad, good = channels
    body = body_msg({"instances": [{"id": "final"}]})
    answers, code = await while_hostile(good, exchange(bad, GOOD_HEADERS, body, body, body))
    assert code == grpc.StatusCode.OK
    assert answers[0] == wire.HEADERS_CONTINUE and len(answers) == 2
    assert json.loads(immediate(answers[1]).body) == {"predictions": [{"echo": "final"}]}


async def test_bodies_over_the_process_limit_get_413_and_the_operator_is_told(
    echo_backend: EchoBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """A policy may allow more than the process receives (its gRPC limit is fixed at start):
    the smaller limit applies, with a clear 413, and the log says what to change."""
    caplog.set_level(logging.WARNING, logger="extproc.main")
    srv = ExtProcServer(
        policies(echo_backend.url), port=0, limits=StreamLimits(max_body_bytes=4_000)
    )  # the policy allows 10,000
    assert "--max-body-bytes 10000" in caplog.text
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            small = await infer(ch, {"instances": ["x" * 100]})
            assert small.status is not None and small.status.code == 200
            # no content-length (chunked): refused by size, before decoding
            big = await infer(ch, {"instances": ["x" * 6_000]})
            assert big.status is not None and big.status.code == 413
            assert "at most 4000" in json.loads(big.body)["error"]
            assert "--max-body-bytes" in json.loads(big.body)["error"]
            # above the gRPC receive limit itself: grpcio refuses the message
            answers, code = await exchange(
                ch, GOOD_HEADERS, body_msg({"instances": ["x" * 80_000]})
            )
            assert (answers, code) == (
                [wire.HEADERS_CONTINUE],
                grpc.StatusCode.RESOURCE_EXHAUSTED,
            )
            await good_request(ch, "still-serving")
    finally:
        await srv.stop(grace=2)


async def test_requests_beyond_max_streams_get_503_and_passthrough_still_flows(
    echo_backend: EchoBackend,
) -> None:
    """The process holds at most --max-streams requests: one more gets a clear 503 with
    Retry-After at once, requests no policy matches still continue, and once a held request
    is answered the next is taken again."""
    srv = ExtProcServer(
        policies(echo_backend.url),
        port=0,
        limits=StreamLimits(max_streams=3),
        max_streams_per_connection=100,  # else the client itself waits at 3 on one connection
    )
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            held = []
            for _ in range(3):  # headers in, waiting for their bodies
                call = ch.stream_stream(METHOD)()
                await call.write(GOOD_HEADERS)
                assert await call.read() == wire.HEADERS_CONTINUE
                held.append(call)
            answers, code = await exchange(ch, GOOD_HEADERS)
            assert code == grpc.StatusCode.OK and len(answers) == 1
            r = immediate(answers[0])
            assert r.status is not None and r.status.code == 503
            assert "retry shortly" in json.loads(r.body)["error"]
            assert r.headers is not None
            sent = {o.header.key: o.header.raw_value for o in r.headers.set_headers if o.header}
            assert sent["retry-after"] == b"1"
            assert await exchange(ch, headers_msg("/other")) == (
                [wire.HEADERS_CONTINUE_SKIP_BODY],
                grpc.StatusCode.OK,
            )
            first = held.pop(0)
            await first.write(body_msg({"instances": [{"id": "held"}]}))
            assert json.loads(immediate(await first.read()).body) == {
                "predictions": [{"echo": "held"}]
            }
            assert await first.read() is grpc.aio.EOF
            await good_request(ch, "after")
            for call in held:
                call.cancel()
    finally:
        await srv.stop(grace=2)
