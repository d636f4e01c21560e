"""envoy/gateway.yaml, the plain Envoy config for operators without a mesh, run for real (with
loopback addresses): model routes are batched through ext_proc, everything else is proxied
without ever reaching it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from mlproxy.stack import Child, Stack, envoy_binary, http_ok
from mlproxy_common import ports
from tests.e2e.test_envoy import ext_proc_metric, post
from tests.servers import EchoBackend

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]


def socket_address(cluster: dict[str, Any]) -> dict[str, Any]:
    (lb_endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    address: dict[str, Any] = lb_endpoint["endpoint"]["address"]["socket_address"]
    return address


@pytest.fixture(scope="module")
def gateway(
    stack: Stack, echo_backend: EchoBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """envoy/gateway.yaml with loopback addresses: the ext_proc cluster at the test stack's
    replica, the models cluster at the echo backend. Everything else is the file as shipped."""
    config = yaml.safe_load((ROOT / "envoy/gateway.yaml").read_text())
    port, admin = ports.reserve(), ports.reserve()
    config["admin"]["address"]["socket_address"].update(address="127.0.0.1", port_value=admin)
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=port)
    clusters = {c["name"]: c for c in config["static_resources"]["clusters"]}
    socket_address(clusters["mlproxy-extproc"]).update(
        address="127.0.0.1", port_value=stack.extproc_ports[0]
    )
    socket_address(clusters["models"]).update(address="127.0.0.1", port_value=echo_backend.port)
    run_dir = tmp_path_factory.mktemp("gateway")
    path = run_dir / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    url = f"http://127.0.0.1:{port}"
    envoy = Child(
        "envoy-gateway",
        [envoy_binary(), "-c", str(path), "--log-level", "warn", "--base-id", str(port)],
        run_dir / "envoy.log",
        ready=lambda: http_ok(f"{url}/healthz"),
    )
    envoy.start()
    try:
        envoy.wait_ready(30)
        yield url
    finally:
        envoy.stop()


async def test_model_routes_are_batched_through_ext_proc(gateway: str) -> None:
    # The first requests may race the cluster's first health check: retry briefly.
    deadline = time.monotonic() + 10
    while True:
        status, headers, body = await post(
            f"{gateway}/v1/models/echo:predict", {"instances": [{"id": "gw-0"}]}
        )
        if status == 200 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert status == 200, body
    assert "x-mlproxy-batch-size" in headers
    answers = await asyncio.gather(
        *(
            post(f"{gateway}/v1/models/echo:predict", {"instances": [{"id": f"gw-{i}"}]})
            for i in range(1, 17)
        )
    )
    assert all(s == 200 and "x-mlproxy-batch-size" in h for s, h, _ in answers)


async def test_other_routes_never_reach_ext_proc(gateway: str, stack: Stack) -> None:
    passthrough = "mlproxy_passthrough_requests_total "
    before = ext_proc_metric(stack, passthrough)
    # A model path no policy matches: ext_proc sees it and lets it through (proxied as is).
    status, headers, _ = await post(
        f"{gateway}/v1/models/nopolicy:predict", {"instances": [{"id": 1}]}
    )
    assert status == 200
    assert "x-mlproxy-batch-size" not in headers
    assert ext_proc_metric(stack, passthrough) == before + 1
    # Outside /v1/models/ the filter is off: the backend answers (its own 404) and ext_proc
    # never hears of it.
    for _ in range(5):
        status, headers, _ = await post(f"{gateway}/api/other", {"x": 1})
        assert status == 404
        assert "x-mlproxy-batch-size" not in headers
    assert ext_proc_metric(stack, passthrough) == before + 1
    async with aiohttp.ClientSession() as session, session.get(f"{gateway}/healthz") as resp:
        assert resp.status == 200
        assert await resp.read() == b"ok\n"
