"""The open-loop load generator against a real HTTP server that misbehaves on request."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator

import numpy as np
import pytest
from aiohttp import web

from bench.openloop import _parse, replay
from mlproxy_common import ports


class Server:
    """An aiohttp server in a thread. A request's JSON body says what to do: `hold` (answer
    only when `hold_until` requests have arrived), `abort` (close the connection without an
    answer), `never` (no answer at all), `chunked` (answer in chunks); else echo at once."""

    def __init__(self, hold_until: int = 0) -> None:
        self.port = ports.reserve()
        self.hold_until = hold_until
        self.arrived = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.arrived += 1
        if self.arrived >= self.hold_until:
            self._all_in.set()
        do = body.get("do")
        if do == "hold":
            try:
                await asyncio.wait_for(self._all_in.wait(), 5)
            except TimeoutError:
                return web.json_response({"error": "not all requests came"}, status=503)
        elif do == "abort":
            assert request.transport is not None
            request.transport.abort()
            await asyncio.sleep(1)
        elif do == "never":
            await asyncio.sleep(30)
        elif do == "chunked":
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            await resp.write(b'{"i": ')
            await resp.write(str(body["i"]).encode() + b"}")
            await resp.write_eof()
            return resp
        return web.json_response({"i": body["i"]})

    def __enter__(self) -> Server:
        async def start() -> None:
            self._all_in = asyncio.Event()
            app = web.Application()
            app.router.add_post("/p", self._handle)
            self._runner = web.AppRunner(app, shutdown_timeout=0.1)
            await self._runner.setup()
            await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

        self._thread.start()
        asyncio.run_coroutine_threadsafe(start(), self._loop).result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._runner is not None
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


@pytest.fixture
def server() -> Iterator[Server]:
    with Server(hold_until=20) as s:
        yield s


def _bodies(actions: dict[int, str]) -> list[bytes]:
    return [json.dumps({"i": i, "do": actions.get(i, "")}).encode() for i in range(40)]


def test_requests_leave_on_schedule_while_earlier_ones_are_unanswered(server: Server) -> None:
    """The server answers nothing until all 20 requests are in: a closed loop on 2 connections
    would stall; an open loop sends all 20 and gets every answer."""
    bodies = _bodies(dict.fromkeys(range(20), "hold"))
    times = [i * 0.01 for i in range(20)]
    result = replay(
        "127.0.0.1", server.port, "/p", times, bodies.__getitem__, timeout=10, connections=2
    )
    assert list(result.status) == [200] * 20
    assert [json.loads(b)["i"] for b in result.bodies] == list(range(20))  # each its own
    assert result.connections >= 20  # new connections while the first two were busy
    assert np.isfinite(result.send_error).all()
    # latency counts from the request's scheduled time: the first waited for the last
    assert result.latency[0] >= times[-1] - times[0]


def test_lost_and_timed_out_requests_are_counted_and_the_others_answered(
    server: Server,
) -> None:
    server.hold_until = 0
    bodies = _bodies({3: "abort", 5: "never", 7: "chunked"})
    times = [i * 0.005 for i in range(12)]
    result = replay(
        "127.0.0.1", server.port, "/p", times, bodies.__getitem__, timeout=0.5, connections=4
    )
    assert result.status[3] == 0 and result.status[5] == 0
    assert result.lost == 2
    assert np.isnan(result.latency[3]) and np.isnan(result.latency[5])
    ok = [i for i in range(12) if i not in (3, 5)]
    assert all(result.status[i] == 200 for i in ok)
    assert all(json.loads(result.bodies[i])["i"] == i for i in ok)  # chunked one included


def test_nothing_listening_counts_every_request_as_lost() -> None:
    port = ports.reserve()
    with pytest.raises(OSError):  # the warm pool cannot connect: say so before the run
        replay("127.0.0.1", port, "/p", [0.0, 0.01], lambda i: b"{}", timeout=1)


def test_an_unsorted_schedule_is_refused() -> None:
    with pytest.raises(ValueError, match="sorted"):
        replay("127.0.0.1", 1, "/p", [0.2, 0.1], lambda i: b"{}", connections=0)


def test_parse_http_responses() -> None:
    raw = bytearray(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello")
    assert _parse(raw[:-1]) is None  # the body is not all there
    status, headers, body, used = _parse(raw)  # type: ignore[misc]
    assert (status, headers["x-a"], body, used) == (200, "1", b"hello", len(raw))
    chunked = bytearray(
        b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\nHTTP/1.1"
    )
    status, _, body, used = _parse(chunked)  # type: ignore[misc]
    assert (status, body) == (503, b"abcde") and chunked[used:] == b"HTTP/1.1"
    partial = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab"
    assert _parse(bytearray(partial)) is None

    with pytest.raises(ValueError):
        _parse(bytearray(b"SSH-2.0-OpenSSH\r\n\r\n"))


class _Closer(asyncio.Protocol):
    """Answers each request, then closes the connection a moment later without saying so
    (no `Connection: close`): the client's idle pool holds connections that are dead."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf:
            body = b'{"ok": true}'
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            asyncio.get_running_loop().call_later(0.002, self.transport.close)
            self.buf = b""


def test_connections_the_server_closes_while_idle_never_hang_the_run() -> None:
    port = ports.reserve()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(
        loop.create_server(_Closer, "127.0.0.1", port), loop
    ).result(5)
    try:
        times = [i * 0.004 for i in range(150)]  # closes race with reuse all along
        result = replay("127.0.0.1", port, "/p", times, lambda i: b"{}", timeout=2, connections=4)
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    # every request is accounted for, once: answered, or lost to a connection that died
    assert set(result.status.tolist()) <= {0, 200}
    assert (result.status == 200).sum() + result.lost == 150
    assert (result.status == 200).sum() > 0


def test_an_error_while_sending_stops_the_run_and_is_raised(server: Server) -> None:
    def body(i: int) -> bytes:
        if i == 3:
            raise RuntimeError("no body for request 3")
        return json.dumps({"i": i}).encode()

    before = threading.active_count()
    with pytest.raises(RuntimeError, match="request 3"):
        replay("127.0.0.1", server.port, "/p", [i * 0.01 for i in range(10)], body, timeout=2)
    assert threading.active_count() == before  # its threads are gone
