"""Peering under `mlproxy up --tls`: the peer port speaks mTLS with the replicas' own
certificates, so a forward works and a plaintext caller (even with the fleet token) gets
nothing."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator

import grpc
import pytest

from extproc.adapters.peers import AUTH_METADATA, FORWARD_PATH, ForwardRequest, sign
from mlproxy.client import ApiError, Client
from mlproxy.stack import Stack
from tests.e2e.test_peering import post_all, replica_metric
from tests.servers import EchoBackend
from tests.waiting import eventually

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def tls_fleet(
    tmp_path_factory: pytest.TempPathFactory, echo_backend: EchoBackend
) -> Iterator[tuple[Stack, Client]]:
    stack = Stack(
        envoy_port=0,
        replicas=2,
        controlplane_port=0,
        seed_demo=False,
        tls=True,
        run_dir=tmp_path_factory.mktemp("peering-tls"),
    )
    try:
        stack.start(timeout=60)
        assert stack.pki is not None
        api = Client(stack.controlplane_url, stack.admin_token, ca_file=stack.pki.ca)
        api.put_policy(
            "sealed",
            {
                "match": {"path": "/v1/peered/{model}:predict"},
                "backend": {"url": f"{echo_backend.url}/v1/models/{{model}}:predict"},
                "sla": {"latency_ms": 5000, "percentile": 99},
                "batching": {"mode": "static", "max_batch_size": 64, "max_wait_ms": 100},
            },
        )

        def ready() -> bool:
            try:
                status = api.status("sealed")
            except ApiError:
                return False
            return bool(status["complete"] and status["replicas"] == 2) and all(
                replica_metric(stack, i, "mlproxy_peer_members") == 2 for i in range(2)
            )

        eventually(ready, 30, "rollout and peering")
        yield stack, api
    finally:
        dead = stack.dead_child()
        stack.stop()
        stack.release_ports()
    assert dead is None, f"{dead.name} died; log:\n{dead.log_tail()}"


def test_replicas_forward_to_each_other_over_mtls(tls_fleet: tuple[Stack, Client]) -> None:
    stack, _ = tls_fleet
    models = [f"tls{k}" for k in range(8)]  # keys on both replicas, whatever the hash
    requests = [(stack.envoy_url, m, f"t-{m}-{n}") for m in models for n in range(6)]
    answers = asyncio.run(post_all(requests))
    for _, _, rid in requests:
        assert answers[rid] == (200, {"predictions": [{"echo": rid}]}), rid
    forwarded = sum(
        replica_metric(stack, i, "mlproxy_peer_forwarded_total", outcome="ok") for i in range(2)
    )
    fallback = sum(
        replica_metric(stack, i, "mlproxy_peer_forwarded_total", outcome="fallback")
        for i in range(2)
    )
    assert forwarded > 0 and fallback == 0, (forwarded, fallback)


def test_a_plaintext_caller_with_the_token_is_not_served(
    tls_fleet: tuple[Stack, Client], echo_backend: EchoBackend
) -> None:
    stack, _ = tls_fleet
    assert stack.peer_token_file is not None
    token = stack.peer_token_file.read_bytes().strip()
    payload = ForwardRequest(
        "sealed",
        f"{echo_backend.url}/v1/models/plain:predict",
        "/v1/peered/plain:predict",
        "ip:127.0.0.1",
        None,
        0.0,
        0.0,
        json.dumps({"instances": [{"id": "plaintext-caller"}]}).encode(),
    ).encode()
    with (
        grpc.insecure_channel(f"127.0.0.1:{stack.peer_ports[0]}") as channel,
        pytest.raises(grpc.RpcError) as err,
    ):
        channel.unary_unary(FORWARD_PATH)(
            payload, metadata=((AUTH_METADATA, sign(token, payload, time.time())),), timeout=5
        )
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "plaintext-caller" not in echo_backend.sent_ids()
