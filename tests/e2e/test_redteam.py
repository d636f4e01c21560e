"""Red team findings on issue 12, as regressions through the real stack. Each is marked
xfail(strict=True) until it is fixed: it fails on the code it was found on."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
import yarl

from mlproxy.stack import Stack
from tests.e2e.test_envoy import ext_proc_metric

pytestmark = pytest.mark.e2e


async def post_as(
    source_ip: str, url: str, body: Any, headers: dict[str, str] | None = None, timeout: float = 30
) -> tuple[int, dict[str, str], bytes]:
    """POST from a loopback address of our choosing, with extra request headers."""
    connector = aiohttp.TCPConnector(local_addr=(source_ip, 0))
    async with (
        aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(timeout)) as s,
        s.post(url, json=body, headers=headers or {}) as r,
    ):
        return r.status, {k.lower(): v for k, v in r.headers.items()}, await r.read()


@pytest.mark.xfail(
    strict=True,
    reason="red team: X-Forwarded-For sets Envoy's source.address (use_remote_address is not "
    "set), so one client spoofs as many identities as it likes and takes the whole queue",
)
async def test_a_client_cannot_take_other_clients_shares_by_sending_x_forwarded_for(
    stack: Stack,
) -> None:
    """Policy `fair` holds 4 requests. A flooder on one address sends 8, each with another
    `X-Forwarded-For`: it is still one client (the peer Envoy saw), so another client's
    request must find room (by evicting one of the flooder's), as when the flooder sends none."""
    url = f"{stack.envoy_url}/v1/models/fair:predict"
    depth = 'mlproxy_queue_depth{policy="fair"}'
    flood = [
        asyncio.create_task(
            post_as(
                "127.0.0.2",
                url,
                {"instances": [{"id": f"x{i}"}]},
                headers={"X-Forwarded-For": f"203.0.113.{i + 1}"},
            )
        )
        for i in range(8)
    ]
    try:
        for _ in range(200):  # until the flooder's requests fill the queue
            if ext_proc_metric(stack, depth) >= 4:
                break
            await asyncio.sleep(0.02)
        assert ext_proc_metric(stack, depth) == 4
        code, _, body = await post_as("127.0.0.3", url, {"instances": [{"id": "polite"}]})
    finally:
        flooded = await asyncio.gather(*flood)
    assert code == 200, body
    assert json.loads(body) == {"predictions": [{"echo": "polite"}]}
    assert sorted(c for c, _, _ in flooded).count(429) >= 5


@pytest.mark.xfail(
    strict=True,
    reason="red team: a policy's path with percent-encoded characters (demo%3Apredict) does "
    "not match in ext_proc, which passes the request through; the model decodes the path and "
    "answers it: no batching, no max_body_bytes, no queue limit, no per-client share",
)
@pytest.mark.parametrize("path", ["/v1/models/demo%3Apredict", "/v1/%6Dodels/demo:predict"])
async def test_a_policy_path_cannot_be_bypassed_by_percent_encoding_it(
    stack: Stack, path: str
) -> None:
    """The demo model (Envoy's upstream for every path) reads `%3A` as `:` and `%6D` as `m`,
    as KServe's and most HTTP servers' routers do: the request is its policy's, so it must go
    through MLProxy (its answer carries x-mlproxy-batch-size) or be refused by it."""
    url = yarl.URL(f"{stack.envoy_url}{path}", encoded=True)
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s,
        s.post(url, json={"instances": [[0.5] * 16]}) as r,
    ):
        code, headers, body = r.status, {k.lower() for k in r.headers}, await r.read()
    if code == 200:
        assert "x-mlproxy-batch-size" in headers, f"answered by the model unbatched: {body!r}"
    else:
        assert "error" in json.loads(body), body
