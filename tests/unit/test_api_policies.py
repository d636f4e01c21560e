"""`/v1/policies` on the in-memory store, no Redis (tests/unit/conftest.py): versions and
ETags, preconditions (412), dry runs, validation errors as JSON, the tuner's decisions."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from controlplane.adapters.memory import MemoryServer, MemoryStore
from controlplane.app import create_app
from controlplane.domain.backend_hosts import BackendHosts
from controlplane.tuner_loop import FleetTuner
from tests.unit.conftest import (
    READER,
    NoRedis,
    api_client,
    auth,
    heartbeat,
    policy_body,
    settings,
)

pytestmark = pytest.mark.usefixtures("no_redis")


async def put(client: httpx.AsyncClient, name: str, doc: dict[str, Any], **headers: str) -> Any:
    return await client.put(f"/v1/policies/{name}", json=doc, headers={**auth(), **headers})


async def test_create_read_update_delete_with_versions_and_etags(
    client: httpx.AsyncClient,
) -> None:
    r = await put(client, "iris", policy_body())
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["name"] == "iris" and first["version"] >= 1
    assert r.headers["etag"] == f'"{first["version"]}"'
    r = await client.get("/v1/policies/iris", headers=auth(READER))
    assert (r.status_code, r.json(), r.headers["etag"]) == (200, first, f'"{first["version"]}"')
    r = await put(client, "iris", policy_body(max_batch_size=8), **{"If-Match": r.headers["etag"]})
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["version"] > first["version"]
    assert second["created_at"] == first["created_at"] != second["updated_at"]
    r = await client.get("/v1/policies", headers=auth(READER))
    assert r.json() == {"items": [second]}
    assert (await client.delete("/v1/policies/iris", headers=auth())).status_code == 204
    r = await client.get("/v1/policies/iris", headers=auth())
    assert (r.status_code, r.json()) == (404, {"error": "policy iris does not exist"})
    assert (await client.delete("/v1/policies/iris", headers=auth())).status_code == 404
    r = await put(client, "iris", policy_body())  # made again: the versions continue
    assert r.status_code == 201 and r.json()["version"] > second["version"] + 1


async def test_a_get_with_a_matching_if_none_match_is_304(client: httpx.AsyncClient) -> None:
    tag = (await put(client, "m", policy_body())).headers["etag"]
    for value in (tag, f"W/{tag}", '"0", ' + tag, "*"):
        r = await client.get("/v1/policies/m", headers={**auth(), "If-None-Match": value})
        assert (r.status_code, r.headers["etag"], r.content) == (304, tag, b""), value
    r = await client.get("/v1/policies/m", headers={**auth(), "If-None-Match": '"0"'})
    assert r.status_code == 200
    r = await client.get("/v1/policies/m", headers={**auth(), "If-None-Match": "nonsense"})
    assert r.status_code == 400 and "If-None-Match" in r.json()["error"]


async def test_stale_and_conditional_writes_are_412_and_change_nothing(
    client: httpx.AsyncClient,
) -> None:
    stored = (await put(client, "m", policy_body())).json()
    v = stored["version"]
    cases = [
        ("put", {"If-Match": f'"{v - 1}"'}, f"is at version {v}"),
        ("put", {"If-Match": f'W/"{v}"'}, "a weak W/ tag never matches"),
        ("put", {"If-None-Match": "*"}, "If-None-Match: *"),
        ("put", {"If-None-Match": f'"{v}"'}, "one of the tags given"),
        ("delete", {"If-Match": f'"{v + 5}"'}, "read it again"),
    ]
    for method, headers, says in cases:
        if method == "put":
            r = await put(client, "m", policy_body(max_batch_size=2), **headers)
        else:
            r = await client.delete("/v1/policies/m", headers={**auth(), **headers})
        assert r.status_code == 412 and says in r.json()["error"], (headers, r.text)
    r = await put(client, "new", policy_body(), **{"If-Match": "*"})  # nothing to match
    assert r.status_code == 412 and "does not exist" in r.json()["error"]
    assert (await client.get("/v1/policies/m", headers=auth())).json() == stored
    r = await put(client, "m", policy_body(), **{"If-Match": "nonsense"})
    assert r.status_code == 400 and "If-Match must be" in r.json()["error"]
    r = await put(client, "m", policy_body(max_batch_size=4), **{"If-Match": f'"{v}"'})
    assert r.status_code == 200 and r.json()["version"] > v


async def test_a_dry_run_checks_everything_and_stores_nothing(
    client: httpx.AsyncClient, memory_store: MemoryStore
) -> None:
    r = await client.put("/v1/policies/m?dry_run=true", json=policy_body(), headers=auth())
    assert r.status_code == 201 and r.json()["version"] == 0 and "etag" not in r.headers
    assert await memory_store.all_policies() == []
    stored = (await put(client, "m", policy_body())).json()
    r = await client.put(
        "/v1/policies/m?dry_run=1", json=policy_body(max_batch_size=2), headers=auth()
    )
    assert r.status_code == 200 and r.headers["etag"] == f'"{stored["version"]}"'
    assert r.json()["batching"]["max_batch_size"] == 2
    assert r.json()["version"] == stored["version"]
    r = await client.put(
        "/v1/policies/m?dry_run=true",
        json=policy_body(),
        headers={**auth(), "If-None-Match": "*"},
    )
    assert r.status_code == 412
    r = await client.put("/v1/policies/m?dry-run=true", json=policy_body(), headers=auth())
    assert r.status_code == 400 and "unknown query parameter 'dry-run'" in r.json()["error"]
    r = await client.put(
        "/v1/policies/m?dry_run=true&dry_run=false", json=policy_body(), headers=auth()
    )
    assert r.status_code == 400 and "more than once" in r.json()["error"]
    assert [p.model_dump(mode="json") for p in await memory_store.all_policies()] == [stored]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"batching": {"max_batch_size": 0}}, "batching.max_batch_size"),
        ({"sla": {"percentile": 200}}, "sla.percentile"),
        ({"colour": "red"}, "colour"),
        ({"backend": {"url": "file:///etc/passwd"}}, "backend.url"),
        ({"codec": "xml"}, "codec"),
        ({"tuning": {"replicas": 10**400}}, "tuning.replicas"),
    ],
)
async def test_invalid_policies_are_422_json_naming_the_field(
    client: httpx.AsyncClient,
    memory_store: MemoryStore,
    change: dict[str, Any],
    field: str,
) -> None:
    r = await put(client, "m", {**policy_body(), **change})
    assert r.status_code == 422 and r.headers["content-type"] == "application/json"
    assert list(r.json()) == ["error"] and field in r.json()["error"]
    assert await memory_store.all_policies() == []


async def test_bad_names_types_sizes_and_a_name_that_differs(client: httpx.AsyncClient) -> None:
    ok = json.dumps(policy_body())
    json_type = {**auth(), "Content-Type": "application/json"}
    cases = [
        (client.put("/v1/policies/Bad_Name", json=policy_body(), headers=auth()), 422),
        (
            client.put("/v1/policies/m", content=ok, headers={**auth(), "Content-Type": "text/x"}),
            415,
        ),
        (client.put("/v1/policies/m", content="x" * 5000, headers=json_type), 413),
        (client.put("/v1/policies/m", content="{not json", headers=json_type), 422),
        (
            client.put("/v1/policies/m", json={**policy_body(), "name": "other"}, headers=auth()),
            422,
        ),
    ]
    for call, status in cases:
        r = await call
        assert r.status_code == status and "error" in r.json(), (status, r.text)


async def test_backends_outside_the_allowlist_are_422(
    memory_store: MemoryStore, no_redis: NoRedis
) -> None:
    app = create_app(settings(backend_hosts=BackendHosts.parse("model")), memory_store)
    async with api_client(app) as client:
        assert (await put(client, "m", policy_body())).status_code == 201
        elsewhere = {**policy_body(), "backend": {"url": "http://evil.example/x"}}
        r = await put(client, "m", elsewhere)
        assert r.status_code == 422 and "evil.example" in r.json()["error"]


async def test_the_tuners_decisions_are_listed_newest_first(
    client: httpx.AsyncClient, memory_store: MemoryStore, server: MemoryServer
) -> None:
    adaptive = {**policy_body(mode="adaptive"), "sla": {"latency_ms": 300}}
    v = (await put(client, "m", adaptive)).json()["version"]
    r = await client.get("/v1/policies/m/decisions", headers=auth(READER))
    assert (r.status_code, r.json()) == (200, {"items": []})
    stats = {
        "window_s": 60,
        "requests": 3000,
        "arrival_rate": 40.0,
        "sla_misses": 60,  # 2%: more than the tuner aims for
        "batches": 40,
        "mean_batch_size": 20.5,
        "batch_samples": [[size, 20.0 + 2.0 * size] for size in range(1, 41)],
    }
    generation = memory_store.generation
    for rid in ("r1", "r2"):
        heartbeat(server, rid, generation, policies={"m": v}, stats={"m": stats})
    now = [1000.0]
    tuner = FleetTuner(memory_store, clock=lambda: now[0], hold=5.0)
    assert [d.policy for d in await tuner.run_once()] == ["m"]
    now[0] += 5
    assert [d.policy for d in await tuner.run_once()] == ["m"]
    items = (await client.get("/v1/policies/m/decisions", headers=auth(READER))).json()["items"]
    assert len(items) == 2 and items[0]["version"] > items[1]["version"] > v
    assert items[1]["previous_version"] == v and items[0]["inputs"]["replicas"] == 2
    assert "wider margin" in items[0]["reason"]
    stored = (await client.get("/v1/policies/m", headers=auth())).json()
    assert stored["version"] == items[0]["version"] and stored["tuning"]["replicas"] == 2
    r = await client.get("/v1/policies/m/decisions?limit=1", headers=auth())
    assert r.json()["items"] == items[:1]
    assert (await client.get("/v1/policies/m/decisions?limit=0", headers=auth())).status_code == 422
    assert (await client.get("/v1/policies/zz/decisions", headers=auth())).status_code == 404
