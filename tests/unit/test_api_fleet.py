"""`/v1/replicas`, `/v1/policies/{name}/status`, `/v1/store` and `/v1/tuner` from the in-memory
store's heartbeats, generations and lease, no Redis (tests/unit/conftest.py)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from controlplane.adapters.memory import MemoryServer, MemoryStore
from controlplane.app import create_app
from tests.unit.conftest import READER, NoRedis, api_client, auth, heartbeat, policy_body, settings

pytestmark = pytest.mark.usefixtures("no_redis")


async def test_replicas_are_the_live_heartbeats_with_the_store_generation(
    client: httpx.AsyncClient, server: MemoryServer, clock: list[float]
) -> None:
    v = (await client.put("/v1/policies/m", json=policy_body(), headers=auth())).json()["version"]
    generation = server.store["generation"]
    heartbeat(server, "r2", generation, ttl=5, policies={"m": v})
    heartbeat(server, "r1", generation, ttl=60, policies={"m": v}, peer_address="10.0.0.1:7")
    heartbeat(server, "old", "gone", ttl=60, carried={"x": 1})
    r = await client.get("/v1/replicas", headers=auth(READER))
    assert r.status_code == 200
    got = r.json()
    assert [(x["id"], x["peer_address"]) for x in got["items"]] == [
        ("old", None),
        ("r1", "10.0.0.1:7"),
        ("r2", None),
    ]
    store = got["store"]
    assert (store["generation"], store["version"], store["published"]) == (generation, v, False)
    assert (store["replicas"], store["replicas_on_generation"]) == (3, 2)
    assert (store["replicas_carrying"], store["replicas_elsewhere"]) == (["old"], ["old"])
    clock[0] += 10  # r2 stops beating: gone after its TTL
    got = (await client.get("/v1/replicas", headers=auth(READER))).json()
    assert [x["id"] for x in got["items"]] == ["old", "r1"]


async def test_rollout_status_counts_the_replicas_that_run_the_stored_version(
    client: httpx.AsyncClient, server: MemoryServer
) -> None:
    v = (await client.put("/v1/policies/m", json=policy_body(), headers=auth())).json()["version"]
    generation = server.store["generation"]
    heartbeat(server, "r1", generation, policies={"m": v})
    heartbeat(server, "r2", generation, policies={"m": v - 1})
    heartbeat(server, "r3", "another", policies={"m": v})  # same number, another generation
    status = (await client.get("/v1/policies/m/status", headers=auth(READER))).json()
    assert (status["version"], status["generation"]) == (v, generation)
    assert (status["replicas"], status["converged"], status["complete"]) == (3, 1, False)
    assert status["behind"] == [
        {"id": "r2", "address": "r2:50051", "version": v - 1, "generation": generation},
        {"id": "r3", "address": "r3:50051", "version": None, "generation": "another"},
    ]
    for rid in ("r2", "r3"):
        heartbeat(server, rid, generation, policies={"m": v})
    status = (await client.get("/v1/policies/m/status", headers=auth(READER))).json()
    assert (status["converged"], status["complete"], status["behind"]) == (3, True, [])
    assert (await client.get("/v1/policies/zz/status", headers=auth())).status_code == 404


async def test_the_store_after_a_loss_a_new_generation_then_published(
    client: httpx.AsyncClient, server: MemoryServer, memory_store: MemoryStore
) -> None:
    first = (await client.put("/v1/policies/m", json=policy_body(), headers=auth())).json()
    old = (await client.get("/v1/store", headers=auth(READER))).json()
    assert (old["generation"], old["resets_seen"], old["published"]) == (
        server.store["generation"],
        0,
        False,
    )
    server.flush()  # the store loses everything
    heartbeat(server, "r1", old["generation"], carried={"m": first["version"]})
    now = (await client.get("/v1/store", headers=auth(READER))).json()
    assert now["generation"] not in (None, old["generation"])
    assert (now["resets_seen"], now["published"], now["version"]) == (1, False, first["version"])
    assert (now["replicas_carrying"], now["replicas_elsewhere"]) == (["r1"], ["r1"])
    again = (await client.put("/v1/policies/m", json=policy_body(), headers=auth())).json()
    assert again["version"] > first["version"]  # never a version seen before
    r = await client.post("/v1/store/publish", headers=auth())
    assert r.status_code == 200 and r.json()["published"] is True
    assert r.json()["generation"] == now["generation"] == memory_store.generation


async def test_the_tuner_lease_without_and_with_the_tuner(
    memory_store: MemoryStore, server: MemoryServer, no_redis: NoRedis
) -> None:
    async with api_client(create_app(settings(), memory_store)) as client:
        r = await client.get("/v1/tuner", headers=auth(READER))
        assert r.json() == {
            "enabled": False,
            "this": None,
            "leader": None,
            "term": None,
            "leading": False,
        }
    app = create_app(settings(tuner_interval=0.01, tuner_lease=5), memory_store, 0.01)
    async with app.router.lifespan_context(app), api_client(app) as client:
        for _ in range(200):  # the tuner takes the lease at its first round
            got = (await client.get("/v1/tuner", headers=auth(READER))).json()
            if got["leading"]:
                break
            await asyncio.sleep(0.01)
        assert got["enabled"] and got["leading"] and got["leader"] == got["this"]
        assert got["term"] >= 1
        other = memory_store.lease("other", 5)
        assert await other.hold() is None  # one leader
    assert await other.hold() == got["term"] + 1  # given up at shutdown: free at once
