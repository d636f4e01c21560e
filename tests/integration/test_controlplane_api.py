"""The control plane API in-process, on a real Redis."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from controlplane.adapters.redis_store import MAX_RECORD_BYTES, RedisStore
from controlplane.app import create_app
from controlplane.domain.records import Precondition
from controlplane.settings import Settings
from controlplane.tuner_loop import FleetTuner
from mlproxy_common import ports
from mlproxy_kernel import keys

DB = 1  # the `store` fixture's database

ADMIN = "admin-token-0123456789"
READER = "read-token-0123456789"


def body(**batching: Any) -> dict[str, Any]:
    return {
        "match": {"path": "/v1/models/{model}:predict"},
        "backend": {"url": "http://model/v1/models/{model}:predict"},
        "batching": {"max_batch_size": 16, **batching},
    }


@pytest.fixture
async def client(store: RedisStore) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(
        Settings(
            redis_url="unused",
            admin_tokens=(ADMIN,),
            read_tokens=(READER,),
            max_body_bytes=4096,
            tuner_interval=0,  # the tuner is driven by hand below
        ),
        store,
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cp") as c:
        yield c


def auth(token: str = ADMIN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_create_read_update_delete_with_versions_and_etags(client: httpx.AsyncClient) -> None:
    r = await client.put("/v1/policies/iris", json=body(), headers=auth())
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["name"] == "iris" and first["version"] >= 1
    assert r.headers["etag"] == f'"{first["version"]}"'
    r = await client.get("/v1/policies/iris", headers=auth(READER))
    assert r.status_code == 200 and r.json() == first
    r = await client.put(
        "/v1/policies/iris",
        json=body(max_batch_size=8),
        headers={**auth(), "If-Match": f'"{first["version"]}"'},
    )
    assert r.status_code == 200
    second = r.json()
    assert second["version"] > first["version"]
    assert second["created_at"] == first["created_at"] != second["updated_at"]
    assert second["batching"]["max_batch_size"] == 8
    r = await client.get("/v1/policies", headers=auth(READER))
    assert [p["name"] for p in r.json()["items"]] == ["iris"]
    r = await client.delete("/v1/policies/iris", headers=auth())
    assert r.status_code == 204
    assert (await client.get("/v1/policies/iris", headers=auth())).status_code == 404
    assert (await client.delete("/v1/policies/iris", headers=auth())).status_code == 404
    # a policy made again continues the version sequence
    r = await client.put("/v1/policies/iris", json=body(), headers=auth())
    assert r.json()["version"] > second["version"]


async def test_get_output_can_be_put_back(client: httpx.AsyncClient) -> None:
    created = (await client.put("/v1/policies/m", json=body(), headers=auth())).json()
    r = await client.put("/v1/policies/m", json=created, headers=auth())
    assert r.status_code == 200, r.text
    r = await client.put("/v1/policies/m", json={**created, "name": "other"}, headers=auth())
    assert r.status_code == 422 and "URL says" in r.json()["error"]


async def test_body_rules_are_stored_and_omitted_when_unset(client: httpx.AsyncClient) -> None:
    with_rule = body()
    with_rule["match"] = {"path": "/v1/embeddings", "body": {"model": "bge-small"}}
    with_rule["backend"] = {"url": "http://bge/v1/embeddings"}
    r = await client.put("/v1/policies/bge", json=with_rule, headers=auth())
    assert r.status_code == 201, r.text
    got = (await client.get("/v1/policies/bge", headers=auth())).json()
    assert got["match"] == {"path": "/v1/embeddings", "body": {"model": "bge-small"}}
    await client.put("/v1/policies/plain", json=body(), headers=auth())
    plain = (await client.get("/v1/policies/plain", headers=auth())).json()
    assert "body" not in plain["match"]  # what the operator wrote, nothing more


async def test_stale_and_conditional_writes_get_412(client: httpx.AsyncClient) -> None:
    v = (await client.put("/v1/policies/m", json=body(), headers=auth())).json()["version"]
    stale = {**auth(), "If-Match": f'"{v - 1}"'}
    r = await client.put("/v1/policies/m", json=body(max_batch_size=2), headers=stale)
    assert r.status_code == 412 and "not" in r.json()["error"]
    r = await client.put("/v1/policies/m", json=body(), headers={**auth(), "If-None-Match": "*"})
    assert r.status_code == 412
    r = await client.delete("/v1/policies/m", headers=stale)
    assert r.status_code == 412
    r = await client.get("/v1/policies/m", headers=auth())
    assert r.json()["version"] == v and r.json()["batching"]["max_batch_size"] == 16


async def test_concurrent_writes_exactly_one_wins(client: httpx.AsyncClient) -> None:
    v = (await client.put("/v1/policies/m", json=body(), headers=auth())).json()["version"]
    cond = {**auth(), "If-Match": f'"{v}"'}
    results = await asyncio.gather(
        *(
            client.put("/v1/policies/m", json=body(max_batch_size=n), headers=cond)
            for n in range(1, 11)
        )
    )
    codes = sorted(r.status_code for r in results)
    assert codes == [200] + [412] * 9
    (winner,) = [r.json() for r in results if r.status_code == 200]
    stored = (await client.get("/v1/policies/m", headers=auth())).json()
    assert stored == winner


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"batching": {"max_batch_size": 0}}, "batching.max_batch_size"),
        ({"sla": {"percentile": 200}}, "sla.percentile"),
        ({"colour": "red"}, "colour"),
        ({"backend": {"url": "file:///etc/passwd"}}, "backend.url"),
        ({"codec": "xml"}, "codec"),
        # an int no float holds: ext_proc's plan overflowed on it (every request a 500)
        ({"tuning": {"replicas": 10**400}}, "tuning.replicas"),
    ],
)
async def test_invalid_policies_are_422_naming_the_field_and_not_stored(
    client: httpx.AsyncClient, store: RedisStore, change: dict[str, Any], field: str
) -> None:
    r = await client.put("/v1/policies/m", json={**body(), **change}, headers=auth())
    assert r.status_code == 422
    assert field in r.json()["error"]
    assert await store.all_policies() == []


async def test_bad_names_sizes_types_and_tokens(
    client: httpx.AsyncClient, store: RedisStore
) -> None:
    ok = json.dumps(body())
    cases = [
        (client.put("/v1/policies/Bad_Name", json=body(), headers=auth()), 422),
        (
            client.put(
                "/v1/policies/m", content=ok, headers={**auth(), "Content-Type": "text/plain"}
            ),
            415,
        ),
        (
            client.put(
                "/v1/policies/m",
                content="x" * 5000,
                headers={**auth(), "Content-Type": "application/json"},
            ),
            413,
        ),
        (
            client.put(
                "/v1/policies/m",
                content="{not json",
                headers={**auth(), "Content-Type": "application/json"},
            ),
            422,
        ),
        (client.put("/v1/policies/m", json=body()), 401),
        (client.put("/v1/policies/m", json=body(), headers=auth("wrong-token-0123456789")), 401),
        (client.put("/v1/policies/m", json=body(), headers=auth(READER)), 403),
        (client.delete("/v1/policies/m", headers=auth(READER)), 403),
        (client.get("/v1/policies"), 401),
        (client.get("/v1/replicas", headers={"Authorization": "Basic abc"}), 401),
        (
            client.put("/v1/policies/m", json=body(), headers={**auth(), "If-Match": "nonsense"}),
            400,
        ),
    ]
    for call, status in cases:
        r = await call
        assert r.status_code == status, (status, r.text)
        assert "error" in r.json()
    assert await store.all_policies() == []


async def test_streamed_body_over_the_limit_is_413(client: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b" " * 1000

    r = await client.put(
        "/v1/policies/m", content=chunks(), headers={**auth(), "Content-Type": "application/json"}
    )
    assert r.status_code == 413


async def heartbeat(
    store: RedisStore,
    rid: str,
    version: int,
    stats: dict[str, Any] | None = None,
    **extra: Any,
) -> None:
    """What replica `rid` would write: it runs policy `m` at `version` of the store's
    current generation."""
    now = datetime.now(UTC).isoformat()
    record = {
        "id": rid,
        "address": f"{rid}:50051",
        "started_at": now,
        "heartbeat_at": now,
        "policies": {"m": version},
        "generation": (await store.info()).generation,
        "source_ok": True,
        "last_sync_at": now,
        "stats": {} if stats is None else {"m": stats},
        **extra,
    }
    await store.redis.set(keys.replica_key(rid), json.dumps(record), px=5000)


async def test_replicas_and_rollout_status(client: httpx.AsyncClient, store: RedisStore) -> None:
    v = (await client.put("/v1/policies/m", json=body(), headers=auth())).json()["version"]
    # r1 with peering on (its peer address signed), r2 a record without those fields
    signature = "1800000000000." + "ab" * 32
    await heartbeat(store, "r1", v, peer_address="10.0.0.1:50052", peer_signature=signature)
    await heartbeat(store, "r2", v - 1)
    r = await client.get("/v1/replicas", headers=auth(READER))
    items = r.json()["items"]
    assert [x["id"] for x in items] == ["r1", "r2"]
    assert [(x["peer_address"], x["peer_signature"]) for x in items] == [
        ("10.0.0.1:50052", signature),
        (None, None),
    ]
    status = (await client.get("/v1/policies/m/status", headers=auth(READER))).json()
    assert (status["replicas"], status["converged"], status["complete"]) == (2, 1, False)
    assert status["behind"] == [
        {"id": "r2", "address": "r2:50051", "version": v - 1, "generation": status["generation"]}
    ]
    assert (await client.get("/v1/policies/zz/status", headers=auth())).status_code == 404


async def test_replica_records_too_long_or_not_strings_are_skipped_not_fetched_whole(
    client: httpx.AsyncClient, store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    """What Redis holds is hostile (the ext_proc Redis user writes replica records): a record
    over 1 MB is skipped with an error, never fetched whole or parsed; so is a key with a name
    over keys.MAX_KEY_NAME_BYTES; a key of another type under the pattern is no failure; the
    genuine records are listed."""
    v = (await client.put("/v1/policies/m", json=body(), headers=auth())).json()["version"]
    await heartbeat(store, "r1", v)
    await heartbeat(store, "big", v, pad="x" * MAX_RECORD_BYTES)
    await store.redis.rpush(keys.replica_key("a-list"), "x")
    await heartbeat(store, "n" * (1 << 20), v)  # a name no replica has (1 MB): never read
    try:
        r = await client.get("/v1/replicas", headers=auth(READER))
        assert [x["id"] for x in r.json()["items"]] == ["r1"]
        assert f"replica record in Redis over {MAX_RECORD_BYTES} bytes" in caplog.text
        assert f"have names over {keys.MAX_KEY_NAME_BYTES} bytes" in caplog.text
    finally:
        await store.redis.delete(keys.replica_key("a-list"), keys.replica_key("n" * (1 << 20)))


async def test_health_readiness_metrics_and_openapi(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).status_code == 200
    assert (await client.get("/readyz")).json() == {"status": "ready"}
    await client.get("/v1/policies", headers=auth())
    text = (await client.get("/metrics")).text
    assert 'mlproxy_cp_requests_total{method="GET",route="/v1/policies",status="200"}' in text
    assert "mlproxy_cp_redis_up 1.0" in text
    spec = (await client.get("/openapi.json")).json()
    assert "/v1/policies/{name}" in spec["paths"]
    # the bearer scheme is declared, so /docs can send a token; every /v1 route needs it
    assert spec["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http",
        "scheme": "bearer",
        "description": spec["components"]["securitySchemes"]["bearerAuth"]["description"],
    }
    for path, operations in spec["paths"].items():
        for operation in operations.values():
            needs = operation.get("security") == [{"bearerAuth": []}]
            assert needs == path.startswith("/v1/"), (path, operation.get("security"))


async def test_metrics_say_when_redis_is_unreachable() -> None:
    """Each scrape pings Redis, for at most a second: a store nobody listens on is 0, and the
    scrape still answers."""
    nowhere = RedisStore.from_url(f"redis://127.0.0.1:{ports.reserve()}/0")
    app = create_app(Settings(redis_url="unused", admin_tokens=(ADMIN,), tuner_interval=0), nowhere)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://cp") as c:
            started = asyncio.get_running_loop().time()
            r = await c.get("/metrics")
            assert asyncio.get_running_loop().time() - started < 3
    finally:
        await nowhere.close()
    assert r.status_code == 200
    assert "mlproxy_cp_redis_up 0.0" in r.text


def tuner_stats(rate: float) -> dict[str, Any]:
    """A replica's stats for `m`: t(b) = 20 + 2b ms (+0-2 ms), 2% of requests late."""
    return {
        "window_s": 60,
        "requests": 3000,
        "arrival_rate": rate,
        "sla_misses": 60,  # 2%: more than the tuner aims for
        "batches": 40,
        "mean_batch_size": 20.5,
        "batch_samples": [[size, 20.0 + 2.0 * size + (size % 3)] for size in range(1, 41)],
    }


async def test_the_fleet_tuner_writes_a_new_version_and_records_why(
    client: httpx.AsyncClient, store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mlproxy.audit")
    adaptive = {**body(mode="adaptive"), "sla": {"latency_ms": 300}}
    v = (await client.put("/v1/policies/m", json=adaptive, headers=auth())).json()["version"]
    await client.put("/v1/policies/s", json=body(), headers=auth())  # static: never tuned
    r = await client.get("/v1/policies/m/decisions", headers=auth(READER))
    assert (r.status_code, r.json()) == (200, {"items": []})
    for rid in ("r1", "r2", "r3"):
        await heartbeat(store, rid, v, tuner_stats(rate=40.0))

    clock = [1000.0]
    tuner = FleetTuner(store, clock=lambda: clock[0])
    written = await tuner.run_once()
    assert [d.policy for d in written] == ["m"]
    stored = (await client.get("/v1/policies/m", headers=auth())).json()
    assert stored["version"] > v
    tuning = stored["tuning"]
    assert tuning["replicas"] == 3
    assert tuning["seed_per_item_ms"] == pytest.approx(2.0, abs=0.3)
    assert tuning["margin_ms"] > 30  # widened from 10% of the SLA: 2% missed
    assert stored["batching"]["mode"] == "adaptive"  # the operator's fields are untouched
    assert stored["match"] == adaptive["match"]

    # the tuner's write is audited like an operator's, under its own name
    tuned = [json.loads(r.getMessage()) for r in caplog.records if r.name == "mlproxy.audit"]
    assert [(a["event"], a["token"], a["policy"]) for a in tuned][-1:] == [
        ("policy.tune", "fleet-tuner", "m")
    ]
    assert (tuned[-1]["old_version"], tuned[-1]["new_version"]) == (v, stored["version"])
    assert tuned[-1]["changed"] == ["tuning"]
    decisions = (await client.get("/v1/policies/m/decisions", headers=auth(READER))).json()
    [d] = decisions["items"]
    assert (d["version"], d["previous_version"]) == (stored["version"], v)
    assert d["inputs"]["replicas"] == 3 and d["inputs"]["arrival_rate_total"] == 120
    assert d["changes"]["margin_ms"][1] == tuning["margin_ms"]
    assert "wider margin" in d["reason"]
    # nothing again within the minimum interval, even with the same misses
    assert await tuner.run_once() == []
    # an operator's write between the tuner's read and write wins; the tuner retries later
    clock[0] += 60
    real_put = store.put

    async def racing_put(*args: Any, **kwargs: Any) -> Any:
        await real_put("m", {**adaptive, "sla": {"latency_ms": 250}}, Precondition())
        return await real_put(*args, **kwargs)

    store.put = racing_put  # type: ignore[method-assign]
    try:
        assert await tuner.run_once() == []
    finally:
        store.put = real_put  # type: ignore[method-assign]
    assert (await client.get("/v1/policies/m", headers=auth())).json()["sla"]["latency_ms"] == 250
    assert (await client.get("/v1/policies/zz/decisions", headers=auth())).status_code == 404
    r = await client.get("/v1/policies/m/decisions?limit=0", headers=auth())
    assert r.status_code == 422


async def test_the_tuner_holds_a_policy_for_its_hold_then_may_change_it_again(
    client: httpx.AsyncClient, store: RedisStore
) -> None:
    v = (
        await client.put(
            "/v1/policies/m",
            json={**body(mode="adaptive"), "sla": {"latency_ms": 300}},
            headers=auth(),
        )
    ).json()["version"]
    await heartbeat(store, "r1", v, tuner_stats(rate=40.0))  # 2% missed: a wider margin each time
    clock = [1000.0]
    tuner = FleetTuner(store, clock=lambda: clock[0], hold=5.0)
    assert [d.policy for d in await tuner.run_once()] == ["m"]
    clock[0] += 4.9
    assert await tuner.run_once() == []  # held
    clock[0] += 0.1
    [again] = await tuner.run_once()  # the hold is over: the misses go on, the margin widens
    assert "wider margin" in again.reason
    assert len((await client.get("/v1/policies/m/decisions", headers=auth())).json()["items"]) == 2


async def test_the_control_plane_runs_its_tuner_with_the_hold_of_its_settings(
    store: RedisStore,
) -> None:
    """MLPROXY_TUNER_HOLD_S reaches the tuner the app runs: rounds every 50 ms, a policy
    changed at most every 300 ms (the default, a minute, would allow one change here)."""
    settings = Settings(
        redis_url="unused", admin_tokens=(ADMIN,), tuner_interval=0.05, tuner_hold=0.3
    )
    app = create_app(settings, store)
    adaptive = {**body(mode="adaptive"), "sla": {"latency_ms": 300}}
    v = (await store.put("m", adaptive, Precondition())).version
    await heartbeat(store, "r1", v, tuner_stats(rate=40.0))  # 2% missed: a wider margin each time
    async with app.router.lifespan_context(app):
        await asyncio.sleep(1.0)
    decisions = list(reversed(await store.decisions("m")))
    at = [datetime.fromisoformat(d["at"]).timestamp() for d in decisions]
    assert len(at) >= 2, decisions
    # (each record's time is when it was written, a little after its round began)
    assert all(b - a >= 0.25 for a, b in itertools.pairwise(at)), at


async def test_a_crash_is_a_500_with_a_json_error(store: RedisStore) -> None:
    """A bug (here: the store raising something unexpected) answers JSON, not plain text."""
    app = create_app(Settings(redis_url="unused", admin_tokens=(ADMIN,), tuner_interval=0), store)

    async def broken(name: str) -> Any:
        raise RuntimeError(f"planted bug reading {name}")

    store.get = broken  # type: ignore[method-assign]
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://cp") as c:
        r = await c.get("/v1/policies/m", headers=auth())
    assert r.status_code == 500
    assert r.json() == {"error": "internal error answering GET /v1/policies/m; see the log"}
