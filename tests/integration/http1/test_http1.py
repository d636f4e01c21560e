"""The batch call's HTTP/1.1 client (extproc/adapters/http1.py) against a raw socket server
that answers as a broken or hostile backend would: an answer reaches only the call it
belongs to, ambiguous framing is refused, and a connection is reused only when it is clean.

Each case runs on asyncio's event loop and on uvloop's (conftest.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import uvloop

from extproc.adapters import http1
from extproc.adapters.backend import HttpBackend
from extproc.runtime.ports import BackendResponse
from mlproxy_common.tls import make_local_pki
from mlproxy_kernel.errors import ErrorKind, ProxyError


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


Script = Callable[[bytes, int, asyncio.StreamWriter], Awaitable[None]]


class RawBackend:
    """A TCP server that reads each request (head and Content-Length body) and lets a script
    write whatever it likes back: `script(body, n, writer)`, n counting the requests on that
    connection from 0. Counts connections (opened and closed), and keeps each request's
    connection number (from 1) and request target in `seen`."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.closed = 0
        self.seen: list[tuple[int, str]] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawBackend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/models/m:predict"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        number = self.connections
        n = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.seen.append((number, head.split(b" ", 2)[1].decode()))
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                await self.script(body, n, writer)
                await writer.drain()
                n += 1
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.closed += 1
            writer.close()
            self._tasks.discard(task)


@pytest.fixture
async def client() -> AsyncIterator[HttpBackend]:
    backend = HttpBackend()
    yield backend
    await backend.close()


async def call(
    client: HttpBackend, backend: RawBackend, body: bytes, timeout: float = 5.0
) -> BackendResponse:
    return await client.post(backend.url, body, "application/json", timeout, 2, 1 << 20)


def echo(body: bytes) -> bytes:
    return json.dumps({"echo": body.decode()}).encode()


async def echo_script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
    """A sound backend: each request's body echoed, on a connection kept alive."""
    w.write(ok(echo(body)))


async def closing_echo_script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
    """A sound backend that asks for each connection to close: a new connection each call."""
    w.write(ok(echo(body), b"Connection: close\r\n"))


async def lag_once_script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
    """A backend that sends the first answer again before the second call's own, 50 ms later:
    the second call reads the duplicate, and its own answer comes late."""
    if n == 1:
        w.write(ok(b'{"echo": "the first again"}'))
        await w.drain()
        await asyncio.sleep(0.05)
    w.write(ok(echo(body)))


async def test_connections_are_reused_for_clean_answers(client: HttpBackend) -> None:
    async with RawBackend(echo_script) as backend:
        for i in range(5):
            resp = await call(client, backend, b"call-%d" % i)
            assert resp.body == echo(b"call-%d" % i)
        assert backend.connections == 1


async def test_a_second_answer_to_one_request_never_reaches_the_next_call(
    client: HttpBackend,
) -> None:
    """A backend that answers one request twice: the extra answer is another batch's (other
    clients') if it is read as the next call's. The connection is closed instead."""

    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        w.write(ok(echo(body)))
        if n == 0:
            w.write(ok(b'{"echo": "SMUGGLED"}'))

    async with RawBackend(script) as backend:
        first = await call(client, backend, b"first")
        second = await call(client, backend, b"second")
        third = await call(client, backend, b"third")
    assert first.body == echo(b"first")
    assert second.body == echo(b"second")
    assert third.body == echo(b"third")


async def test_bytes_sent_to_an_idle_connection_never_become_the_next_answer(
    client: HttpBackend,
) -> None:
    answered = asyncio.Event()

    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        w.write(ok(echo(body)))
        await w.drain()
        if n == 0:
            await answered.wait()
            w.write(ok(b'{"echo": "UNSOLICITED"}'))  # while the client holds it idle

    async with RawBackend(script) as backend:
        first = await call(client, backend, b"first")
        answered.set()
        await asyncio.sleep(0.05)  # time for the unsolicited answer to arrive: the point
        second = await call(client, backend, b"second")
    assert first.body == echo(b"first")
    assert second.body == echo(b"second")
    assert backend.connections == 2


async def test_a_call_cancelled_mid_answer_leaves_nothing_for_the_next_call(
    client: HttpBackend,
) -> None:
    half_sent = asyncio.Event()
    go_on = asyncio.Event()

    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        answer = ok(echo(body))
        if n == 0:
            w.write(answer[: len(answer) - 5])
            await w.drain()
            half_sent.set()
            await go_on.wait()
            w.write(answer[len(answer) - 5 :])
        else:
            w.write(answer)

    async with RawBackend(script) as backend:
        first = asyncio.create_task(call(client, backend, b"first"))
        await half_sent.wait()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        go_on.set()
        second = await call(client, backend, b"second")
    assert second.body == echo(b"second")


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok!",
        b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/2 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"ICY 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-A: 1\r\n" * 200 + b"Content-Length: 2\r\n\r\nok",
    ],
    ids=[
        "te-and-cl",
        "te-not-chunked",
        "two-lengths",
        "listed-lengths",
        "negative-length",
        "hex-length",
        "space-before-colon",
        "obs-fold",
        "nul-in-value",
        "four-digit-status",
        "http2-status-line",
        "not-http",
        "unasked-upgrade",
        "huge-head",
        "too-many-headers",
    ],
)
async def test_ambiguous_or_invalid_answers_are_refused(client: HttpBackend, answer: bytes) -> None:
    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        w.write(answer)

    async with RawBackend(script) as backend:
        with pytest.raises(ProxyError) as err:
            await call(client, backend, b"x")
    assert err.value.kind is ErrorKind.BACKEND_ERROR
    assert err.value.message == "backend sent an answer that is not valid HTTP"


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"", "backend closed the connection without an answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Le", "backend closed the connection without an answer"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort", "cut off or malformed"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "cut off or malformed"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokX\r\n", "cut off or"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nok", "cut off or malformed"),
        (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", "without an answer"),  # bare LF
    ],
    ids=["nothing", "half-head", "short-body", "bad-chunk-size", "bad-chunk-end", "cut", "lf"],
)
async def test_cut_off_answers_fail_the_call_as_maybe_caused_by_an_input(
    client: HttpBackend, answer: bytes, message: str
) -> None:
    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        w.write(answer)
        await w.drain()
        w.close()

    async with RawBackend(script) as backend:
        with pytest.raises(ProxyError) as err:
            await call(client, backend, b"x")
    assert message in err.value.message
    assert err.value.input_may_cause  # the executor may split the batch to find the input


async def test_chunked_answers_with_extensions_and_trailers_are_read_and_reused(
    client: HttpBackend,
) -> None:
    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        data = echo(body)
        w.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n"
            + b"%x;name=value\r\n%s\r\n" % (3, data[:3])
            + b"%X\r\n%s\r\n" % (len(data) - 3, data[3:])
            + b"0\r\nX-Trailer: 1\r\n\r\n"
        )

    async with RawBackend(script) as backend:
        for i in range(3):
            resp = await call(client, backend, b"chunk-%d" % i)
            assert resp.body == echo(b"chunk-%d" % i)
        assert backend.connections == 1


async def test_interim_answers_are_skipped(client: HttpBackend) -> None:
    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        w.write(ok(echo(body)))

    async with RawBackend(script) as backend:
        resp = await call(client, backend, b"interim")
    assert resp.status == 200 and resp.body == echo(b"interim")


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.0 200 OK\r\nContent-Length: 13\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 13\r\n\r\n",
    ],
    ids=["http-1.0", "connection-close"],
)
async def test_a_connection_is_not_reused_when_the_answer_says_not_to(
    client: HttpBackend, answer: bytes
) -> None:
    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        w.write(answer + b'{"echo": "%d"}' % n)

    async with RawBackend(script) as backend:
        for _ in range(2):
            resp = await call(client, backend, b"x")
            assert resp.body == b'{"echo": "0"}'  # each on a fresh connection
        assert backend.connections == 2


async def test_an_answer_without_framing_ends_with_the_connection(client: HttpBackend) -> None:
    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + echo(body))
        await w.drain()
        w.close()

    async with RawBackend(script) as backend:
        first = await call(client, backend, b"one")
        second = await call(client, backend, b"two")
    assert (first.body, second.body) == (echo(b"one"), echo(b"two"))
    assert first.content_type == "application/json"


async def test_a_backend_trickling_its_head_is_timed_out(client: HttpBackend) -> None:
    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
            w.write(bytes([byte]))
            await w.drain()
            await asyncio.sleep(0.01)  # the point: slower than the call's timeout allows

    async with RawBackend(script) as backend:
        with pytest.raises(ProxyError) as err:
            await call(client, backend, b"x", timeout=0.3)
    assert err.value.kind is ErrorKind.BACKEND_TIMEOUT


async def test_an_early_answer_before_the_body_is_read_is_taken_and_not_reused(
    client: HttpBackend,
) -> None:
    """A server that answers 413 while the request body is still being sent, then closes."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\nno")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        url = f"http://127.0.0.1:{port}/x"
        for _ in range(2):
            resp = await client.post(url, b"x" * (4 << 20), "application/json", 5, 2, 1 << 20)
            assert (resp.status, resp.body) == (413, b"no")
        assert connections == 2
    finally:
        server.close()


async def test_request_header_values_with_line_breaks_are_never_sent(client: HttpBackend) -> None:
    seen: list[bytes] = []

    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        seen.append(body)
        w.write(ok(b"{}"))

    async with RawBackend(script) as backend:
        with pytest.raises(ProxyError, match="backend call failed"):
            await client.post(
                backend.url, b"x", "application/json", 5, 2, 1 << 20, [("x-a", "1\r\nx-b: 2")]
            )
    assert seen == []


def test_a_late_second_answer_waiting_unread_in_the_socket_is_not_the_next_answer(
    client_loop: str,
) -> None:
    """Red team 17: a second answer that reaches the socket while the connection is idle but
    before the event loop polls it (ext_proc busy with other work) was read as the next
    batch's answer. A connection is checked for unread bytes before it is reused. The
    backend is a thread with blocking sockets, so the second answer lands while the event
    loop is held (a blocking wait: the point)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    go, sent = threading.Event(), threading.Event()

    def backend() -> None:
        conns = []
        with listener:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                conns.append(conn)
                body = _read_request(conn)
                conn.sendall(ok(echo(body)))
                if body == b"first":
                    go.wait(10)
                    conn.sendall(ok(b'{"echo": "SMUGGLED"}'))
                    sent.set()
                if body == b"second":
                    break
        for conn in conns:
            conn.close()

    thread = threading.Thread(target=backend, daemon=True)
    thread.start()

    async def calls() -> tuple[bytes, bytes]:
        client = HttpBackend()
        url = f"http://127.0.0.1:{port}/x"
        try:
            first = await client.post(url, b"first", "application/json", 5, 2)
            go.set()
            assert sent.wait(10)  # blocks the loop: the idle connection is not polled
            time.sleep(0.05)  # noqa: ASYNC251 (the point: the loop does not poll meanwhile)
            second = await client.post(url, b"second", "application/json", 5, 2)
        finally:
            await client.close()
        return first.body, second.body

    try:
        run = uvloop.run if client_loop == "uvloop" else asyncio.run
        first, second = run(calls())
    finally:
        listener.close()
        thread.join(10)
    assert first == echo(b"first")
    assert second == echo(b"second")


def _read_request(conn: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(body) < length:
        body += conn.recv(65536)
    return body


@pytest.fixture(params=["asyncio", "uvloop"])
def client_loop(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 204 No Content\r\nContent-Length: 31\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n",
    ],
    ids=["204-with-length", "304-chunked"],
)
async def test_a_bodiless_status_that_announces_a_body_is_not_reused(
    client: HttpBackend, head: bytes
) -> None:
    """Red team 17: a 204 announcing a body that comes a moment later had that body read as
    the next call's answer."""

    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        if body == b"first":
            w.write(head)
            await w.drain()
            await asyncio.sleep(0.001)
            w.write(ok(b'{"echo": "LEAK"}'))
        else:
            w.write(ok(echo(body)))

    async with RawBackend(script) as backend:
        first = await call(client, backend, b"first")
        second = await call(client, backend, b"second")
    assert first.body == b""
    assert second.body == echo(b"second")


async def test_a_chunk_line_over_the_limit_in_one_read_is_refused(client: HttpBackend) -> None:
    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        w.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2;"
            + b"x" * 4096
            + b"\r\nok\r\n0\r\n\r\n"
        )

    async with RawBackend(script) as backend:
        with pytest.raises(ProxyError, match="cut off or malformed"):
            await call(client, backend, b"x")


async def test_an_untrusted_tls_certificate_is_refused_and_said_so(
    client: HttpBackend, tmp_path: Path
) -> None:
    """A backend whose certificate no trusted CA signed: refused, and the client told why
    (not the errno text 'Operation not permitted' its error carries), without the host."""
    pki = make_local_pki(tmp_path / "pki")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server.cert, pki.server.key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ProxyError) as err:
            await client.post(f"https://localhost:{port}/x", b"x", "application/json", 5, 2)
    finally:
        server.close()
    assert err.value.message == (
        "backend is unreachable: its TLS certificate is not trusted (or is not for its host name)"
    )


async def test_an_answer_in_tiny_chunks_is_bounded_and_shares_the_event_loop(
    client: HttpBackend,
) -> None:
    """Red team 17: a body in 1-byte chunks held the event loop for 663 ms, stalling every
    policy. Chunks are capped per answer, and the loop gets a turn every few hundred."""
    turns = 0

    async def ticker() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\nx\r\n" * 70000)
        w.write(b"0\r\n\r\n")

    async with RawBackend(script) as backend:
        tick = asyncio.create_task(ticker())
        try:
            with pytest.raises(ProxyError, match="cut off or malformed"):
                await call(client, backend, b"x")
        finally:
            tick.cancel()
    assert turns > 100  # without the turns: a handful (each network read)


# Pools per backend URL, stray bytes and idle connections (red team 17, second report).


async def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within the time"
        await asyncio.sleep(0.01)


async def test_each_backend_url_has_its_own_connections(client: HttpBackend) -> None:
    """Two models on one host and port: a connection that carried one URL's batch never
    carries the other's, so a broken model server's extra answer stays with its own URL."""

    async with RawBackend(echo_script) as backend:
        base = f"http://127.0.0.1:{backend.port}/v1/models/"
        for name in ("a", "b", "a", "b"):
            resp = await client.post(f"{base}{name}:predict", name.encode(), "text/plain", 5, 2)
            assert resp.body == echo(name.encode())
    assert backend.seen == [
        (1, "/v1/models/a:predict"),
        (2, "/v1/models/b:predict"),
        (1, "/v1/models/a:predict"),
        (2, "/v1/models/b:predict"),
    ]


async def test_a_backend_that_answers_late_twice_misleads_one_call_then_gets_no_reuse() -> None:
    """The case no HTTP/1.1 client can catch as it happens: on each reused connection the
    backend sends the previous request's answer again before the right one, so it reads as
    the next call's answer. The stray bytes after it are seen, and that URL's connections are
    not reused any more: one wrong answer, where every second call got one before. Another URL
    of the same server keeps its connections."""
    strays: list[str] = []
    previous: dict[int, bytes] = {}

    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        if n > 0 and body.startswith(b"call-"):  # the other URL's server is sound
            w.write(ok(echo(previous[id(w)])))
        previous[id(w)] = body
        w.write(ok(echo(body)))

    client = HttpBackend(on_stray=strays.append)
    try:
        async with RawBackend(script) as backend:
            bodies = [b"call-%d" % i for i in range(10)]
            answers = [(await call(client, backend, body)).body for body in bodies]
            wrong = [i for i, body in enumerate(bodies) if answers[i] != echo(body)]
            assert wrong == [1]  # the second call: read before anything looked wrong
            assert answers[1] == echo(b"call-0")
            assert backend.connections == 9  # from the third call on, one each
            assert strays and set(strays) == {backend.url}

            other = f"http://127.0.0.1:{backend.port}/v1/models/other:predict"
            before = backend.connections
            for body in (b"x", b"y"):  # n stays 0 on a new connection: no duplicate
                resp = await client.post(other, body, "text/plain", 5, 2)
                assert resp.body == echo(body)
            assert backend.connections == before + 1  # reused: not that URL's quarantine
    finally:
        await client.close()


async def test_bytes_on_an_idle_connection_are_reported_and_stop_reuse() -> None:
    strays: list[str] = []
    answered = asyncio.Event()

    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        w.write(ok(echo(body)))
        if n == 0:
            await w.drain()
            answered.set()
            await asyncio.sleep(0.05)
            w.write(b"HTTP/1.1 200 OK\r\n")  # nobody asked

    client = HttpBackend(on_stray=strays.append)
    try:
        async with RawBackend(script) as backend:
            await call(client, backend, b"first")
            await answered.wait()
            await wait_for(lambda: bool(strays))
            for body in (b"second", b"third"):
                assert (await call(client, backend, body)).body == echo(body)
            assert backend.connections == 3
    finally:
        await client.close()
    assert strays == [backend.url]


async def test_reuse_resumes_when_the_quarantine_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http1, "QUARANTINE_SECONDS", 0.3)

    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        w.write(ok(echo(body)))
        if body == b"twice":
            w.write(ok(b'{"echo": "SMUGGLED"}'))

    client = HttpBackend()
    try:
        async with RawBackend(script) as backend:
            await call(client, backend, b"twice")
            await call(client, backend, b"a")
            await call(client, backend, b"b")
            assert backend.connections == 3  # quarantined: one each
            await asyncio.sleep(0.4)
            for body in (b"c", b"d", b"e"):
                assert (await call(client, backend, body)).body == echo(body)
            assert backend.connections == 4  # reused again
    finally:
        await client.close()


async def test_idle_connections_close_on_a_timer(
    monkeypatch: pytest.MonkeyPatch, client: HttpBackend
) -> None:
    """A backend no policy calls any more does not keep connections open until the next call
    (aiohttp closed them after 30 s too)."""
    monkeypatch.setattr(http1, "IDLE_SECONDS", 0.2)

    async with RawBackend(echo_script) as backend:
        await call(client, backend, b"once")
        await call(client, backend, b"twice")
        await wait_for(lambda: backend.closed == 1)
        assert (await call(client, backend, b"again")).body == echo(b"again")
        assert backend.connections == 2
        await wait_for(lambda: backend.closed == 2)


async def test_idle_connections_are_bounded_across_urls(
    monkeypatch: pytest.MonkeyPatch, client: HttpBackend
) -> None:
    """A `{model}` URL makes one pool per model: idle connections are bounded in all, the
    longest idle closed first."""
    monkeypatch.setattr(http1, "MAX_IDLE", 2)

    async with RawBackend(echo_script) as backend:
        base = f"http://127.0.0.1:{backend.port}/v1/models/"
        for name in ("a", "b", "c"):
            await client.post(f"{base}{name}:predict", b"x", "text/plain", 5, 2)
        await wait_for(lambda: backend.closed == 1)
        for name in ("c", "b", "a"):
            await client.post(f"{base}{name}:predict", b"x", "text/plain", 5, 2)
        assert [number for number, _ in backend.seen] == [1, 2, 3, 3, 2, 4]


async def test_a_host_name_is_resolved_once_per_dns_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each new connection asked the resolver (in Kubernetes, a query per search domain); with
    a URL's reuse stopped, every batch opens one. Addresses are kept DNS_SECONDS (then used
    while a lookup renews them), and dropped when connecting to them fails (the service
    moved)."""
    asked: list[str] = []
    lookup = http1._lookup

    async def counted(host: str, port: int) -> list[str]:
        asked.append(host)
        return await lookup(host, port)

    monkeypatch.setattr(http1, "_lookup", counted)
    monkeypatch.setattr(http1, "DNS_SECONDS", 0.5)

    client = HttpBackend()
    try:
        async with RawBackend(closing_echo_script) as backend:
            url = f"http://localhost:{backend.port}/x"
            for body in (b"a", b"b", b"c"):
                resp = await client.post(url, body, "text/plain", 5, 2)
                assert resp.body == echo(body)
            assert backend.connections == 3 and asked == ["localhost"]
            await asyncio.sleep(0.6)
            await client.post(url, b"d", "text/plain", 5, 2)  # the old ones, renewed meanwhile
            await wait_for(lambda: not client._pool._resolving)
            assert asked == ["localhost"] * 2
        with pytest.raises(ProxyError, match="unreachable"):  # the backend is gone
            await client.post(url, b"e", "text/plain", 5, 2)
        with pytest.raises(ProxyError, match="unreachable"):
            await client.post(url, b"f", "text/plain", 5, 2)
        assert asked == ["localhost"] * 3  # "e" used them, failed and forgot them
        with pytest.raises(ProxyError, match="the host name does not resolve"):
            await client.post("http://no-such-host.invalid/x", b"g", "text/plain", 5, 2)
    finally:
        await client.close()


# Red team 18: answers a call behind, policies sharing a URL, connection churn, bounds.


async def test_an_answer_lag_no_byte_shows_ends_with_the_connection() -> None:
    """One late duplicate (the first answer sent again when the second request came) and a
    backend that takes a while: each answer then lands after the next request was written,
    and is read as that call's. Nothing at the HTTP level shows it; a connection carries at
    most the policy's backend.calls_per_connection calls, so the lag ends with it."""
    first: dict[str, bytes] = {}

    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        if n == 0 and not first:
            first["body"] = body
            w.write(ok(echo(body)))
            return
        if n == 1 and "dup" not in first:
            first["dup"] = b"sent"
            w.write(ok(echo(first["body"])))  # the duplicate
            await w.drain()
        await asyncio.sleep(0.02)  # the model at work
        w.write(ok(echo(body)))

    strays: list[str] = []
    client = HttpBackend(on_stray=strays.append)
    try:
        async with RawBackend(script) as backend:
            bodies = [b"call-%d" % i for i in range(14)]
            answers = [
                (
                    await client.post(backend.url, body, "text/plain", 5, 2, calls_per_connection=8)
                ).body
                for body in bodies
            ]
    finally:
        await client.close()
    wrong = [i for i, body in enumerate(bodies) if answers[i] != echo(body)]
    assert wrong == list(range(1, 8))  # the first connection's calls after the duplicate
    # Not silent (red team 19): the last call's own answer came while the connection was
    # drained before its reset, and that URL's connections are no longer reused.
    assert strays == [backend.url]
    assert backend.connections == 1 + 6  # one each once quarantined


async def test_two_policies_with_one_backend_url_never_share_a_connection() -> None:
    client = HttpBackend()
    try:
        async with RawBackend(echo_script) as backend:
            for pool in ("tenant-a", "tenant-b", "tenant-a", "tenant-b"):
                await client.post(backend.url, b"x", "text/plain", 5, 2, pool=pool)
    finally:
        await client.close()
    assert [number for number, _ in backend.seen] == [1, 2, 1, 2]


async def test_an_answer_found_to_be_another_calls_retires_its_connection() -> None:
    client = HttpBackend()
    try:
        async with RawBackend(echo_script) as backend:
            resp = await call(client, backend, b"a")
            await call(client, backend, b"b")  # reused: one connection so far
            assert resp.retire is not None
            resp.retire()  # (the caller found the count wrong)
            await call(client, backend, b"c")
            await call(client, backend, b"d")
            assert backend.connections == 2
            await wait_for(lambda: backend.closed == 1)
    finally:
        await client.close()


async def test_an_answer_found_wrong_on_a_fresh_connection_keeps_it() -> None:
    """Red team 19: a poison input an honest backend miscounts made every call of the batch's
    bisection retire a connection (4 to 2,465 connections in 10 s). On a connection that
    carried no earlier call the answer cannot be a lagging one: it stays."""

    client = HttpBackend()
    try:
        async with RawBackend(echo_script) as backend:
            resp = await call(client, backend, b"a")
            assert resp.retire is not None
            resp.retire()
            await call(client, backend, b"b")
            assert backend.connections == 1
    finally:
        await client.close()


async def test_a_lagging_answer_found_by_its_count_is_seen_when_its_own_comes() -> None:
    """The second call reads the first's duplicate; the caller finds its count wrong and
    retires the connection, which is drained: the second call's own answer, late, is stray."""
    strays: list[str] = []

    client = HttpBackend(on_stray=strays.append)
    try:
        async with RawBackend(lag_once_script) as backend:
            await call(client, backend, b"first")
            resp = await call(client, backend, b"second")
            assert resp.body == b'{"echo": "the first again"}' and resp.retire is not None
            resp.retire()
            await wait_for(lambda: bool(strays))
            assert (await call(client, backend, b"third")).body == echo(b"third")
            assert backend.connections == 2
    finally:
        await client.close()
    assert strays == [backend.url]


async def test_garbage_where_a_reused_connections_answer_starts_is_stray() -> None:
    strays: list[str] = []

    async def script(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        w.write(b"XQ garbage\r\n\r\n" if n == 1 else ok(echo(body)))

    client = HttpBackend(on_stray=strays.append)
    try:
        async with RawBackend(script) as backend:
            await call(client, backend, b"a")
            with pytest.raises(ProxyError, match="not valid HTTP"):
                await call(client, backend, b"b")
    finally:
        await client.close()
    assert strays == [backend.url]


async def test_idle_connections_are_bounded_per_backend_host(
    monkeypatch: pytest.MonkeyPatch, client: HttpBackend
) -> None:
    """A client choosing model names makes one URL each (red team 18: 512 connections held
    to one server): idle connections are bounded per host and port, whatever the URL."""
    monkeypatch.setattr(http1, "MAX_IDLE_PER_ORIGIN", 2)

    async with RawBackend(echo_script) as backend:
        base = f"http://127.0.0.1:{backend.port}/v1/models/"
        for name in ("a", "b", "c", "d"):
            await client.post(f"{base}{name}:predict", b"x", "text/plain", 5, 2)
        await wait_for(lambda: backend.closed == 2)
        await client.post(f"{base}d:predict", b"x", "text/plain", 5, 2)
        assert backend.connections == 4  # "d"'s stayed


async def test_one_policys_churn_does_not_close_anothers_idle_connections(
    monkeypatch: pytest.MonkeyPatch, client: HttpBackend
) -> None:
    monkeypatch.setattr(http1, "MAX_IDLE_PER_ORIGIN", 3)

    async with RawBackend(echo_script) as backend:
        base = f"http://127.0.0.1:{backend.port}/v1/models/"
        await client.post(f"{base}honest:predict", b"x", "text/plain", 5, 2, pool="honest")
        for i in range(6):  # a client choosing model names, under another policy
            await client.post(f"{base}m{i}:predict", b"x", "text/plain", 5, 2, pool="churn")
        await client.post(f"{base}honest:predict", b"x", "text/plain", 5, 2, pool="honest")
        assert backend.seen[-1][0] == 1  # the honest policy's first connection, reused


def time_wait_sockets(port: int) -> int:
    """TCP sockets of this host in TIME_WAIT whose remote port is `port`."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table, encoding="ascii") as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "06" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


async def test_connections_this_side_closes_leave_no_time_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Red team 18: connections closed by the thousand (a URL whose reuse stopped, model names
    chosen by a client) left 18,800 TIME_WAIT sockets, and connects slowed to 2 ms each."""
    monkeypatch.setattr(http1, "MAX_IDLE_PER_ORIGIN", 1)

    client = HttpBackend()
    try:
        async with RawBackend(echo_script) as backend:
            base = f"http://127.0.0.1:{backend.port}/v1/models/"
            for i in range(20):  # each closes the one before
                await client.post(f"{base}m{i}:predict", b"x", "text/plain", 5, 2)
            await wait_for(lambda: backend.closed == 19)
            assert time_wait_sockets(backend.port) == 0
    finally:
        await client.close()


async def test_quarantines_are_bounded_and_the_warning_is_not_a_flood(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Red team 18: 50,000 URLs of one hostile backend, each with a stray byte, took 83 MiB,
    and 3,000 model names logged 3,000 warnings. Red team 19: junk URLs filling the table
    ended another backend's quarantine; one backend's URLs now collapse into one entry."""
    monkeypatch.setattr(http1, "MAX_QUARANTINED", 3)
    told: list[str] = []
    pool = http1.Http1Pool(on_stray=told.append)

    def key(host: str, path: str) -> tuple[str, tuple[str, str, int, str]]:
        return ("p", ("http", host, 9, path))

    try:
        pool.stray(key("10.0.0.2", "/real"), "http://10.0.0.2:9/real")
        for i in range(6):
            url = f"http://127.0.0.1:9/v1/models/m{i}:predict?token=secret#frag"
            pool.stray(key("127.0.0.1", f"/v1/models/m{i}:predict"), url)
        assert len(pool._quarantine) <= 3
        assert pool._quarantined(key("10.0.0.2", "/real"))  # not pushed out
        assert pool._quarantined(key("127.0.0.1", "/v1/models/never-seen:predict"))
        assert not pool._quarantined(key("10.0.0.2", "/other"))
        assert len(told) == 7 and "secret" not in "".join(told) and "frag" not in told[1]
        warnings = [r for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1 and "secret" not in warnings[0].getMessage()
    finally:
        await pool.close()


async def test_an_address_that_drops_connections_does_not_take_the_whole_connect_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Red team 19: a name's first address dropped connections (a dead pod, a blackhole) and
    took all of connect_timeout: every call failed while the second address answered. Each
    address gets a share of it, and one that failed goes last for a while."""

    async with RawBackend(closing_echo_script) as backend:
        hole = socket.socket()
        hole.bind(("127.0.0.2", backend.port))
        hole.listen(0)
        queued = [socket.socket() for _ in range(4)]  # its queue full: connects hang
        for s in queued:
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect(("127.0.0.2", backend.port))

        async def two(host: str, port: int) -> list[str]:
            return ["127.0.0.2", "127.0.0.1"]

        monkeypatch.setattr(http1, "_lookup", two)
        client = HttpBackend()
        try:
            url = f"http://backend.test:{backend.port}/x"
            started = time.monotonic()
            resp = await client.post(url, b"a", "text/plain", 5, 1.0)
            assert resp.body == echo(b"a")
            assert time.monotonic() - started < 0.9  # half the timeout on the dead address
            started = time.monotonic()
            assert (await client.post(url, b"b", "text/plain", 5, 1.0)).body == echo(b"b")
            assert time.monotonic() - started < 0.4  # the dead one now last
        finally:
            await client.close()
            for s in [hole, *queued]:
                s.close()


async def test_a_failing_lookup_is_shared_and_remembered_a_moment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Red team 19: every call asked the resolver again for a name that failed slowly, and
    the lookups filled the threads other policies resolve with."""
    monkeypatch.setattr(http1, "DNS_FAILURE_SECONDS", 0.5)
    asked: list[str] = []

    async def failing(host: str, port: int) -> list[str]:
        asked.append(host)
        await asyncio.sleep(0.1)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(http1, "_lookup", failing)
    client = HttpBackend()
    try:
        url = "http://gone.test/x"
        results = await asyncio.gather(
            *(client.post(url, b"x", "text/plain", 5, 2) for _ in range(10)),
            return_exceptions=True,
        )
        assert all(isinstance(r, ProxyError) and "does not resolve" in r.message for r in results)
        with pytest.raises(ProxyError, match="does not resolve"):
            await client.post(url, b"x", "text/plain", 5, 2)
        assert asked == ["gone.test"]  # one lookup for eleven calls
        await asyncio.sleep(0.6)
        with pytest.raises(ProxyError, match="does not resolve"):
            await client.post(url, b"x", "text/plain", 5, 2)
        assert asked == ["gone.test"] * 2
    finally:
        await client.close()


# Red team 20: the watch's places, eviction within a policy and across hosts, DNS outages.


async def test_a_connection_the_backend_closes_frees_its_watch_at_once() -> None:
    """The 1 s watch before a reset had a place per connection until the second was over,
    even when the backend had closed it: a busy policy (here: every call the last, as with
    calls_per_connection 1, on a backend that honours Connection: close) held every place,
    and another policy's lagging answers went unseen."""

    async def closing(body: bytes, n: int, w: asyncio.StreamWriter) -> None:
        w.write(ok(echo(body), b"Connection: close\r\n"))
        await w.drain()
        w.close()

    client = HttpBackend()
    try:
        async with RawBackend(closing) as backend:
            for _ in range(20):
                await client.post(backend.url, b"x", "text/plain", 5, 2, calls_per_connection=1)
            await wait_for(lambda: not client._pool._draining)
    finally:
        await client.close()


async def test_one_policy_holds_at_most_a_quarter_of_the_watch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A backend that keeps every connection open: one policy's last calls fill its share of
    the watch, and another policy's lagging answer is still seen."""
    monkeypatch.setattr(http1, "MAX_DRAINING", 8)
    strays: list[str] = []

    client = HttpBackend(on_stray=strays.append)
    try:
        async with RawBackend(lag_once_script) as backend:
            for _ in range(12):  # policy "busy": each call its connection's last
                await client.post(
                    backend.url, b"x", "text/plain", 5, 2, pool="busy", calls_per_connection=1
                )
            assert client._pool._draining == {"busy": 2}
            for _ in range(2):  # policy "lagging": its second call reads the first's answer
                await client.post(
                    backend.url, b"lag", "text/plain", 5, 2, pool="lag", calls_per_connection=2
                )
            await wait_for(lambda: bool(strays))
    finally:
        await client.close()


async def test_busy_policies_filling_the_watch_give_a_place_to_another(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Red team 21: four busy policies each held their quarter of the watch, every place was
    taken, and a fifth policy's lagging answer went unseen (5 stray events in 36 calls
    against 48 in 49). When the watch is full, the policy holding the most gives up its
    oldest watch to one holding at least two fewer."""
    monkeypatch.setattr(http1, "MAX_DRAINING", 8)
    strays: list[str] = []

    client = HttpBackend(on_stray=strays.append)
    try:
        async with RawBackend(lag_once_script) as backend:
            for policy in ("b1", "b2", "b3", "b4"):  # each call its connection's last
                for _ in range(3):
                    await client.post(
                        backend.url, b"x", "text/plain", 5, 2, pool=policy, calls_per_connection=1
                    )
            assert client._pool._draining == {"b1": 2, "b2": 2, "b3": 2, "b4": 2}
            for _ in range(2):  # policy "lag": its second call reads the first's answer
                await client.post(
                    backend.url, b"lag", "text/plain", 5, 2, pool="lag", calls_per_connection=2
                )
            await wait_for(lambda: bool(strays))
            assert client._pool._draining["b1"] == 1  # the first of the biggest gave one up
    finally:
        await client.close()


def _watch(pool: http1.Http1Pool, policy: str) -> http1._Connection:
    """A connection of `policy` handed to the pool's watch, as a call's last one is."""
    conn = http1._Connection(lambda: None)
    pool._drain((policy, ("http", "backend", 80, "/")), conn)
    return conn


async def test_another_policys_churn_ends_few_watches_and_a_small_policy_still_gets_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Red team 22: a policy whose connections close at once (its backend closes them, or
    every call is its last) held no place, so each of its drains into a full watch ended a
    busy policy's oldest watch: the busy policies' watches lasted a few ms, and a lag of
    200 ms was never seen. One policy ends at most TAKES_PER_SECOND watches a second, and
    another policy that needs a place still gets one."""
    monkeypatch.setattr(http1, "MAX_DRAINING", 8)
    monkeypatch.setattr(http1, "TAKES_PER_SECOND", 2.0)
    pool = http1.Http1Pool()
    loop = asyncio.get_running_loop()
    busy: list[http1._Connection] = []

    def refill() -> None:  # the busy policies drain as fast as they lose places
        for i in range(4):
            while pool._draining.get(f"b{i}", 0) < 2:
                busy.append(_watch(pool, f"b{i}"))

    try:
        refill()
        assert pool._draining == {"b0": 2, "b1": 2, "b2": 2, "b3": 2}
        began = loop.time()
        for _ in range(50):  # each closed by its backend a moment later
            _watch(pool, "churn").close()
            refill()
            await asyncio.sleep(0.001)
        ended = sum(conn.closed for conn in busy)
        # a burst of 2, then 2 a second (and one for a slow clock's rounding); 50 before
        assert 1 <= ended <= 2 + int((loop.time() - began) * 2) + 1
        small = _watch(pool, "small")
        assert not small.closed
        assert sum(conn.closed for conn in busy) == ended + 1
    finally:
        await pool.close()


async def test_tied_policies_give_up_their_places_in_turn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Red team 22: among policies tied for the most places, the first to have had a watch
    gave up every place, since it refills as fast as it loses them. The tied policy whose
    oldest watch is oldest gives it up."""
    monkeypatch.setattr(http1, "MAX_DRAINING", 8)
    pool = http1.Http1Pool()
    try:
        for _ in range(2):
            for i in range(4):
                _watch(pool, f"b{i}")
                await asyncio.sleep(0.001)  # distinct start times
        lost: list[str] = []
        for _ in range(4):
            before = dict(pool._draining)
            _watch(pool, "churn").close()  # takes a place, then its backend closes it
            loser = next(p for p, n in before.items() if pool._draining.get(p, 0) < n)
            lost.append(loser)
            _watch(pool, loser)  # the busy policy refills at once
        assert sorted(lost) == ["b0", "b1", "b2", "b3"]
    finally:
        await pool.close()


async def test_model_names_a_client_chooses_do_not_close_a_used_models_connection(
    monkeypatch: pytest.MonkeyPatch, client: HttpBackend
) -> None:
    """One policy for every model (a Triton or KServe server): random model names made a
    connection each and closed the longest idle, which was the connection a real model kept
    reusing, and then (red team 21) a model called now and then lost its connection between
    two calls. Connections of URLs called fewer than SETTLED_CALLS times go first."""
    monkeypatch.setattr(http1, "MAX_IDLE_PER_ORIGIN", 3)
    async with RawBackend(echo_script) as backend:
        base = f"http://127.0.0.1:{backend.port}/v1/models/"
        names = iter(range(1000))
        for _ in range(8):  # the real model, called now and then between random names
            await client.post(f"{base}real:predict", b"x", "text/plain", 5, 2)
            for _ in range(6):
                await client.post(f"{base}m{next(names)}:predict", b"x", "text/plain", 5, 2)
        real = [number for number, target in backend.seen if "real" in target]
        assert len(set(real[-4:])) == 1  # once called SETTLED_CALLS times: one connection


async def test_one_policys_churn_on_one_host_does_not_close_another_hosts_connections(
    monkeypatch: pytest.MonkeyPatch, client: HttpBackend
) -> None:
    """The bound on all idle connections closed the longest idle of all: another host's."""
    monkeypatch.setattr(http1, "MAX_IDLE", 3)
    async with RawBackend(echo_script) as honest, RawBackend(echo_script) as churned:
        for _ in range(2):
            await client.post(honest.url, b"x", "text/plain", 5, 2, pool="honest")
        base = f"http://127.0.0.1:{churned.port}/v1/models/"
        for i in range(6):
            await client.post(f"{base}m{i}:predict", b"x", "text/plain", 5, 2, pool="churn")
        await client.post(honest.url, b"x", "text/plain", 5, 2, pool="honest")
        assert honest.connections == 1


async def test_addresses_are_kept_through_a_resolver_outage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Red team 20: a lookup started during a half-second resolver outage failed every call
    for 9 s. Addresses past their time are used while a lookup renews them, and kept when it
    fails."""
    monkeypatch.setattr(http1, "DNS_SECONDS", 0.2)
    down = [False]
    lookup = http1._lookup

    async def flaky(host: str, port: int) -> list[str]:
        if down[0]:
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return await lookup(host, port)

    monkeypatch.setattr(http1, "_lookup", flaky)

    client = HttpBackend()
    try:
        async with RawBackend(closing_echo_script) as backend:
            url = f"http://localhost:{backend.port}/x"
            await client.post(url, b"a", "text/plain", 5, 2)
            down[0] = True
            await asyncio.sleep(0.3)  # the addresses' time is over; the resolver fails
            for body in (b"b", b"c", b"d"):
                assert (await client.post(url, body, "text/plain", 5, 2)).body == echo(body)
                await asyncio.sleep(0.1)
    finally:
        await client.close()


async def test_a_host_name_dns_cannot_carry_does_not_resolve() -> None:
    client = HttpBackend()
    try:
        for host in ("a..b.test", "x" * 64 + ".test"):
            with pytest.raises(ProxyError, match="the host name does not resolve"):
                await client.post(f"http://{host}/x", b"x", "text/plain", 5, 2)
    finally:
        await client.close()


async def test_old_addresses_go_when_the_name_is_gone_or_too_old(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Red team 21: each failed renewal kept the old addresses again, so a name removed from
    DNS was served them for ever (an address another service may have by then). They are
    kept through an outage, for DNS_STALE_SECONDS at most, and never once the name is gone."""
    monkeypatch.setattr(http1, "DNS_SECONDS", 0.05)
    monkeypatch.setattr(http1, "DNS_FAILURE_SECONDS", 0.05)
    monkeypatch.setattr(http1, "DNS_STALE_SECONDS", 0.5)
    error = [0]
    lookup = http1._lookup

    async def changing(host: str, port: int) -> list[str]:
        if error[0]:
            raise socket.gaierror(error[0], "lookup failed")
        return await lookup(host, port)

    monkeypatch.setattr(http1, "_lookup", changing)

    async def calls(client: HttpBackend, url: str, seconds: float) -> list[bool]:
        got = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                await client.post(url, b"x", "text/plain", 5, 2)
                got.append(True)
            except ProxyError:
                got.append(False)
            await asyncio.sleep(0.02)
        return got

    async with RawBackend(closing_echo_script) as backend:
        url = f"http://localhost:{backend.port}/x"
        client = HttpBackend()
        try:
            await client.post(url, b"x", "text/plain", 5, 2)
            error[0] = socket.EAI_AGAIN  # an outage: served from the old addresses a while
            outage = await calls(client, url, 1.0)
            assert outage[:5] == [True] * 5 and not outage[-1]  # not past DNS_STALE_SECONDS
        finally:
            await client.close()
        error[0] = 0
        client = HttpBackend()
        try:
            await client.post(url, b"x", "text/plain", 5, 2)
            error[0] = socket.EAI_NONAME  # the name is gone
            gone = await calls(client, url, 0.4)
            assert False in gone and True not in gone[gone.index(False) :]  # none after
        finally:
            await client.close()
