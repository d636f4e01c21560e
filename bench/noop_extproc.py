"""A do-nothing ext_proc server: the floor of what any Python ext_proc on grpcio costs.

It speaks the same protocol as MLProxy (headers -> continue, body -> ImmediateResponse) but
answers every request with one canned body, without parsing, queueing or calling a backend.

    python bench/noop_extproc.py PORT [--variant answer|batch|no-header-response]

Variants (bench/floor.py runs them side by side):
- `answer` (the default, bench/overhead.py's floor): each message answered at once.
- `batch`: the body's answer is held, and one timer every 2 ms releases every held answer at
  once, as a batcher does without a backend: what holding streams costs grpcio.
- `no-header-response`: for Envoy's `request_body_mode: STREAMED` with
  `send_body_without_waiting_for_header_response`: the headers message is never answered, the
  body (every chunk up to end_of_stream) is read and the immediate response is the only
  message sent: three gRPC messages a request instead of four, and one round trip less.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_listener")  # as `mlproxy extproc`

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from extproc.adapters import wire
from extproc.adapters.servicer import SERVICE_NAME

ANSWER = wire.encode_immediate_response(
    200, [("content-type", "application/json")], b'{"predictions":[[0.25,0.25,0.25,0.25]]}'
)
VARIANTS = ("answer", "batch", "no-header-response")
BATCH_WAIT = 0.002


class Held:
    """The `batch` variant's held answers: one timer releases them all."""

    def __init__(self) -> None:
        self.waiting: list[asyncio.Future[None]] = []
        self.timer: asyncio.TimerHandle | None = None

    async def hold(self) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self.waiting.append(future)
        if self.timer is None:
            self.timer = loop.call_later(BATCH_WAIT, self.release)
        await future

    def release(self) -> None:
        self.timer = None
        waiting, self.waiting = self.waiting, []
        for future in waiting:
            if not future.done():
                future.set_result(None)


def handler(variant: str) -> Any:
    held = Held()

    async def process(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        wire.decode_processing_request(await context.read())
        if variant == "no-header-response":
            while not wire.decode_processing_request(await context.read()).end_of_stream:
                pass
        else:
            await context.write(wire.HEADERS_CONTINUE)
            wire.decode_processing_request(await context.read())
            if variant == "batch":
                await held.hold()
        await context.write(ANSWER)

    return process


async def serve(port: int, process: Any) -> None:
    """Serve `process` as the ext_proc method on 127.0.0.1:`port` until stopped."""
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                SERVICE_NAME, {"Process": grpc.stream_stream_rpc_method_handler(process)}
            ),
        )
    )
    # Envoy's health check asks for the ext_proc service, as of a real replica.
    checks = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await checks.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    await server.wait_for_termination()


if __name__ == "__main__":
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("--variant", choices=VARIANTS, default="answer")
    args = parser.parse_args()
    uvloop.run(serve(args.port, handler(args.variant)))
