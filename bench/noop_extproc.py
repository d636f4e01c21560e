"""A do-nothing ext_proc server: the floor of what any Python ext_proc on grpcio costs.

It speaks the same protocol as MLProxy (headers -> continue, body -> ImmediateResponse) but
answers every request with one canned body, without parsing, queueing or calling a backend.

    python bench/noop_extproc.py PORT
"""

from __future__ import annotations

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


async def process(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
    wire.decode_processing_request(await context.read())
    await context.write(wire.HEADERS_CONTINUE)
    wire.decode_processing_request(await context.read())
    await context.write(ANSWER)


async def main(port: int) -> None:
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

    uvloop.run(main(int(sys.argv[1])))
