"""ext_proc's gRPC servers: the port Envoy calls and the peer port, with their limits.

grpcio fixes a server's options (message sizes, streams) when it starts; what they follow
from is here. docs/security.md, "ext_proc's gRPC port: limits".
"""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2_grpc

from extproc.adapters.servicer import StreamLimits, stream_headroom
from mlproxy_common.tls import TlsFiles, add_grpc_port, grpc_server_credentials

__all__ = ["MAX_SEND_BYTES", "MESSAGE_FRAMING_BYTES", "envoy_server", "peer_server"]

# Envoy's buffered body arrives in one message: the gRPC receive limit is the largest body this
# process takes (StreamLimits.max_body_bytes, `--max-body-bytes`) plus this much for the rest of
# the ProcessingRequest (request attributes, metadata). grpcio fixes it when the server starts.
MESSAGE_FRAMING_BYTES = 64 * 1024
# Answers carry one request's part of a backend answer: allow what a model may send back.
MAX_SEND_BYTES = 64 * 1024 * 1024 + MESSAGE_FRAMING_BYTES


def envoy_server(
    handler: grpc.GenericRpcHandler,
    healthy: health.aio.HealthServicer,
    address: str,
    tls: TlsFiles | None,
    limits: StreamLimits,
    max_streams_per_connection: int,
    reuse_port: bool,
) -> tuple[grpc.aio.Server, int]:
    """The server Envoy's ext_proc filter calls, bound (not started), and its bound port."""
    server = grpc.aio.server(
        # Beyond --max-streams the servicer answers 503; this is the hard stop (streams that
        # never send their headers): grpcio closes those at once (CANCELLED).
        maximum_concurrent_rpcs=limits.max_streams + stream_headroom(limits.max_streams),
        options=[
            ("grpc.max_receive_message_length", limits.max_body_bytes + MESSAGE_FRAMING_BYTES),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.max_concurrent_streams", max_streams_per_connection),
            # Streams that arrived but that this process has not taken yet (grpcio's aio
            # server takes one at a time). grpcio's defaults, 1,000 then 3,000, cancel new
            # streams at random in between: a burst of 3,000 slow clients through Envoy lost
            # about 6% of its requests (500s), and a normal request among them could too.
            ("grpc.server.max_pending_requests", limits.max_streams),
            ("grpc.server.max_pending_requests_hard_limit", limits.max_streams * 2),
            # Off unless this is one of several workers on the port (`--workers`): a second
            # replica started on a taken port must fail, not share it.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    server.add_generic_rpc_handlers((handler,))
    health_pb2_grpc.add_HealthServicer_to_server(healthy, server)
    bound = add_grpc_port(server, address, tls)
    if bound == 0:
        raise OSError(f"ext_proc cannot listen on {address} (in use?)")
    return server, bound


def peer_server(
    handler: grpc.GenericRpcHandler,
    healthy: health.aio.HealthServicer,
    address: str,
    tls: TlsFiles | None,
    limits: StreamLimits,
) -> grpc.aio.Server:
    """The port other replicas forward requests to (this one owns their key), bound (not
    started). Calls are signed with the fleet token; with the replica's TLS files also mTLS
    (the peers present their own certificates, signed by the same CA)."""
    server = grpc.aio.server(
        maximum_concurrent_rpcs=limits.max_streams,
        options=[
            ("grpc.max_receive_message_length", limits.max_body_bytes + MESSAGE_FRAMING_BYTES),
            ("grpc.max_send_message_length", MAX_SEND_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )
    server.add_generic_rpc_handlers((handler,))
    # The same health service as the Envoy port: peers probe an owner that is late.
    health_pb2_grpc.add_HealthServicer_to_server(healthy, server)
    if tls is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, grpc_server_credentials(tls))
    if bound == 0:
        raise OSError(f"ext_proc cannot listen for peers on {address} (in use?)")
    return server
