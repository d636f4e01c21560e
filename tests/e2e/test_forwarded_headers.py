"""What the real Envoy, with the generated config, sends ext_proc of a request: the headers
ext_proc reads and nothing else a client sends (credentials, cookies, any other header), and
the request line as attributes (docs/security.md, "What ext_proc sees of a request").

A recording ext_proc (grpcio, in a thread of this process) stands in for MLProxy's so that the
messages Envoy sends are seen as they arrive; that MLProxy serves requests with this config is
what every other end-to-end test runs on."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from extproc.adapters import wire
from extproc.adapters.servicer import SERVICE_NAME, headers_read
from mlproxy.envoy_config import FORWARDED_HEADERS, local_config
from mlproxy.stack import Child, envoy_binary, free_port, http_ok, tcp_ok
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
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Recorder]]:
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


SECRETS = {
    "Authorization": "Bearer client-a-secret-token",
    "Cookie": "session=client-a-session",
    "X-Api-Key": "client-a-api-key",
    "Proxy-Authorization": "Basic Y2xpZW50OmE=",
}


def test_the_config_forwards_exactly_the_headers_ext_proc_reads() -> None:
    assert set(FORWARDED_HEADERS) == headers_read()


def test_ext_proc_gets_the_headers_it_reads_and_none_of_a_clients_secrets(
    stack: tuple[int, Recorder],
) -> None:
    port, recorder = stack
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
