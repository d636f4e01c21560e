"""Health, readiness, metrics and the error model, on the in-memory store, no Redis
(tests/unit/conftest.py): a store that is down makes /readyz 503 and every /v1 route a JSON
503 with Retry-After, while /healthz and /metrics still answer; and the guard that keeps these
tests off Redis is shown to work."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest

from controlplane.adapters.memory import MemoryServer, MemoryStore
from controlplane.adapters.redis_store import RedisStore
from controlplane.app import create_app
from tests.unit.conftest import READER, NoRedis, api_client, auth, policy_body, settings

pytestmark = pytest.mark.usefixtures("no_redis")


async def test_health_readiness_and_metrics_while_the_store_is_up_then_down(
    client: httpx.AsyncClient, server: MemoryServer
) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    await client.get("/v1/policies", headers=auth())
    text = (await client.get("/metrics")).text
    assert 'mlproxy_cp_requests_total{method="GET",route="/v1/policies",status="200"}' in text
    assert "mlproxy_cp_redis_up 1.0" in text

    server.down = True
    r = await client.get("/readyz")
    assert r.status_code == 503
    assert r.json() == {"error": "policy store unreachable (in-memory store is down)"}
    assert (await client.get("/healthz")).status_code == 200  # alive, not ready
    r = await client.get("/metrics")
    assert r.status_code == 200 and "mlproxy_cp_redis_up 0.0" in r.text

    server.down = False
    assert (await client.get("/readyz")).status_code == 200
    assert "mlproxy_cp_redis_up 1.0" in (await client.get("/metrics")).text


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/policies"),
        ("GET", "/v1/policies/m"),
        ("PUT", "/v1/policies/m"),
        ("PUT", "/v1/policies/m?dry_run=true"),
        ("DELETE", "/v1/policies/m"),
        ("GET", "/v1/policies/m/status"),
        ("GET", "/v1/policies/m/decisions"),
        ("GET", "/v1/replicas"),
        ("GET", "/v1/store"),
        ("POST", "/v1/store/publish"),
    ],
)
async def test_every_route_answers_503_json_while_the_store_is_down(
    client: httpx.AsyncClient, server: MemoryServer, method: str, path: str
) -> None:
    server.down = True
    r = await client.request(method, path, json=policy_body(), headers=auth())
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json() == {"error": "policy store unavailable (in-memory store is down); retry later"}


async def test_unknown_paths_and_methods_are_json_errors(client: httpx.AsyncClient) -> None:
    r = await client.get("/v2/policies", headers=auth())
    assert r.status_code == 404
    assert r.json() == {"error": "no such path: /v2/policies (the API is under /v1/; see /docs)"}
    r = await client.post("/v1/policies/m", headers=auth())
    assert r.status_code == 405 and r.headers["allow"] == "GET, PUT, DELETE"
    assert r.json()["error"].startswith("POST is not allowed on /v1/policies/m")


async def test_the_openapi_document_asks_every_v1_route_for_a_token(
    client: httpx.AsyncClient,
) -> None:
    spec = (await client.get("/openapi.json")).json()
    assert {"/v1/policies/{name}", "/v1/replicas", "/v1/store", "/v1/tuner"} <= set(spec["paths"])
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            needs = operation.get("security") == [{"bearerAuth": []}]
            assert needs == path.startswith("/v1/"), path


async def test_the_live_page_is_served_without_a_token(client: httpx.AsyncClient) -> None:
    r = await client.get("/ui/")
    assert r.status_code == 200 and "default-src 'none'" in r.headers["content-security-policy"]
    assert (await client.get("/ui/app.js")).status_code == 200
    assert (await client.get("/v1/policies", headers=auth(READER))).json() == {"items": []}


async def test_the_guard_refuses_any_connection_to_redis(no_redis: NoRedis) -> None:
    """What makes these tests prove that the API runs without Redis: a Redis store (a route
    that reached one by mistake) fails, and the test would fail at its end even had the app
    turned the error into an answer."""
    store = RedisStore.from_url("redis://127.0.0.1:6379/0")
    try:
        with pytest.raises(AssertionError, match="no Redis here"):
            await store.ping()
    finally:
        await store.close()
    with socket.socket() as sock, pytest.raises(AssertionError, match="no Redis here"):
        sock.connect(("127.0.0.1", 6379))  # nor any other client
    assert no_redis.attempts == ["redis-py to 127.0.0.1:6379", "socket to ('127.0.0.1', 6379)"]
    no_redis.attempts.clear()  # the guard's own test: seen, so not a failure


class _FrozenStore(MemoryStore):
    """A store whose PING never comes back (Redis stopped with SIGSTOP, a dead connection)."""

    async def ping(self) -> bool:
        await asyncio.Event().wait()
        return True


async def test_readiness_answers_within_its_bound_when_the_store_does_not_answer(
    server: MemoryServer,
) -> None:
    # Red team 15: /readyz waited as long as the store did (5 s with Redis stopped) where the
    # docs promise at most 1 s, so a probe with a shorter timeout saw no answer at all.
    async with api_client(create_app(settings(), _FrozenStore(server))) as client:
        async with asyncio.timeout(10):
            r = await client.get("/readyz")
        assert r.status_code == 503
        assert r.json() == {"error": "policy store unreachable (no answer within 1.0 s)"}
        assert "mlproxy_cp_redis_up 0.0" in (await client.get("/metrics")).text
