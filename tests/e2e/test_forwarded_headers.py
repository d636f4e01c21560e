"""What the real Envoy, with the generated config, sends ext_proc of a request: the headers
ext_proc reads and nothing else a client sends (credentials, cookies, any other header), and
the request line as attributes (docs/security.md, "What ext_proc sees of a request").
The test on the shared stack runs first: it forks that stack before this module's grpcio
threads exist.

A recording ext_proc (grpcio, in a thread of this process) stands in for MLProxy's so that the
messages Envoy sends are seen as they arrive; that MLProxy serves requests with this config is
what every other end-to-end test runs on."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
import yaml

from extproc.adapters import wire
from extproc.adapters.servicer import SERVICE_NAME, headers_read
from mlproxy.envoy_config import FORWARDED_HEADERS, local_config
from mlproxy.stack import Child, Stack, envoy_binary, free_port, http_ok, tcp_ok
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

ANSWER = wire.encode_immediate_response(200, [("content-type", "application/json")], b"{}")


class Recorder:
    """An ext_proc that records each request-headers message and answers 200 at once."""

    def __init__(self) -> None:
        self.port = free_port()
        self.seen: list[wire.Message] = []
        self._loop = asyncio.new_event_loop()
        self._server: grpc.aio.Server | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _process(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        self.seen.append(wire.decode_processing_request(await context.read()))
        await context.write(wire.HEADERS_CONTINUE)
        await context.read()
        await context.write(ANSWER)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._loop.run_forever()

    async def _start(self) -> None:
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE_NAME, {"Process": grpc.stream_stream_rpc_method_handler(self._process)}
                ),
            )
        )
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self._server.start()

    def start(self) -> None:
        self._thread.start()
        eventually(lambda: tcp_ok("127.0.0.1", self.port), 30, "the recording ext_proc listens")

    def stop(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                await self._server.stop(None)

        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Recorder]]:
    """Envoy with the generated config in front of the recorder; yields Envoy's port."""
    run_dir: Path = tmp_path_factory.mktemp("forwarded")
    recorder = Recorder()
    port, admin = free_port(), free_port()
    config = local_config(
        listener_port=port,
        admin_port=admin,
        extproc=[("127.0.0.1", recorder.port)],
        model_port=free_port(),
    )
    path = run_dir / "envoy.yaml"
    path.write_text(yaml.safe_dump(config))
    envoy = Child(
        "envoy",
        [envoy_binary(), "-c", str(path), "--log-level", "warn", "--concurrency", "1"],
        run_dir / "envoy.log",
        ready=lambda: http_ok(f"http://127.0.0.1:{admin}/ready"),
    )
    envoy.start()  # before grpcio's threads exist in this process: it forks
    try:
        envoy.wait_ready(60)
        recorder.start()
        try:
            yield port, recorder
        finally:
            recorder.stop()
    finally:
        envoy.stop()


def post(port: int, path: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=b'{"instances": [[1, 2]]}', headers=headers
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        status: int = response.status
        return status


def h2_post(port: int, path: bytes, body: bytes) -> tuple[int, bytes]:
    """One HTTP/2 (prior knowledge) POST whose path is sent byte for byte, as a client may."""
    config = h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
    )
    conn = h2.connection.H2Connection(config)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        conn.initiate_connection()
        headers = [
            (b":method", b"POST"),
            (b":path", path),
            (b":scheme", b"http"),
            (b":authority", b"mlproxy"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        conn.send_headers(1, headers)
        conn.send_data(1, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        status, data = 0, b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed before the answer ended ({status})")
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    return status, data
                elif isinstance(event, h2.events.StreamReset):
                    raise AssertionError(f"stream reset: {event}")
            sock.sendall(conn.data_to_send())


def test_a_query_string_that_is_not_utf8_is_batched_like_any_other(stack: Stack) -> None:
    """Red team 26 F1: Envoy passes an HTTP/2 query string on as it came, in the request.path
    attribute (a protobuf string, which upb refuses when it is not UTF-8): ext_proc aborted the
    stream, so the client got a 500, and with fail-open its request bypassed MLProxy."""
    body = json.dumps({"instances": [[0.5] * 16]}).encode()
    status, answer = h2_post(stack.envoy_port, b"/v1/models/demo:predict?q=\xff\xfe", body)
    assert status == 200, answer
    clean = h2_post(stack.envoy_port, b"/v1/models/demo:predict?q=ok", body)
    assert json.loads(answer) == json.loads(clean[1])
    assert "predictions" in json.loads(answer)


SECRETS = {
    "Authorization": "Bearer client-a-secret-token",
    "Cookie": "session=client-a-session",
    "X-Api-Key": "client-a-api-key",
    "Proxy-Authorization": "Basic Y2xpZW50OmE=",
}


def test_the_config_forwards_exactly_the_headers_ext_proc_reads() -> None:
    assert set(FORWARDED_HEADERS) == headers_read()


def test_ext_proc_gets_the_headers_it_reads_and_none_of_a_clients_secrets(
    recorded: tuple[int, Recorder],
) -> None:
    port, recorder = recorded
    before = len(recorder.seen)
    read = {
        "X-Request-Id": "req-forwarded-1",
        "X-Mlproxy-Deadline-Ms": "250",
        "Traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "Inference-Header-Content-Length": "12",
    }
    status = post(
        port,
        "/v1/models/demo:predict?variant=a",
        {**SECRETS, **read, "Content-Type": "application/json", "X-Other": "client-a-other"},
    )
    assert status == 200
    (msg,) = recorder.seen[before:]
    assert msg.kind == "request_headers"
    assert set(msg.headers) == {"content-length", *(k.lower() for k in read)}
    assert msg.headers["x-request-id"]  # Envoy's own for a request from outside
    assert msg.headers["x-mlproxy-deadline-ms"] == "250"
    # No pseudo-header: the request line comes as attributes, query string included.
    assert msg.attributes["request.path"] == "/v1/models/demo:predict?variant=a"
    assert msg.attributes["request.method"] == "POST"
    # Nothing of the client's credentials anywhere in what ext_proc got.
    text = repr(msg)
    for value in (*SECRETS.values(), "client-a-other"):
        assert value not in text
