"""Tokens and the audit log, on the in-memory store, no Redis (tests/unit/conftest.py): read
tokens read, admin tokens also write, anything else is 401 or 403 before the body is read;
every write leaves one audit line naming the token, never the token itself."""

from __future__ import annotations

import json
import logging
from typing import Any

import httpx
import pytest

from controlplane.adapters.memory import MemoryStore
from controlplane.app import create_app
from controlplane.settings import Token
from tests.unit.conftest import ADMIN, READER, NoRedis, api_client, auth, policy_body, settings

pytestmark = pytest.mark.usefixtures("no_redis")


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "says"),
    [
        ("GET", "/v1/policies", {}, 401, "missing bearer token"),
        ("GET", "/v1/replicas", {"Authorization": "Basic abc"}, 401, "missing bearer token"),
        ("GET", "/v1/store", auth("wrong-token-0123456789"), 401, "invalid token"),
        ("PUT", "/v1/policies/m", {}, 401, "missing bearer token"),
        ("PUT", "/v1/policies/m", auth(READER), 403, "lacks the 'admin' scope"),
        ("DELETE", "/v1/policies/m", auth(READER), 403, "lacks the 'admin' scope"),
        ("POST", "/v1/store/publish", auth(READER), 403, "lacks the 'admin' scope"),
    ],
)
async def test_a_request_without_the_right_token_is_refused_as_json(
    client: httpx.AsyncClient,
    memory_store: MemoryStore,
    method: str,
    path: str,
    headers: dict[str, str],
    status: int,
    says: str,
) -> None:
    r = await client.request(method, path, json=policy_body(), headers=headers)
    assert r.status_code == status and says in r.json()["error"], r.text
    if status == 401:
        assert r.headers["www-authenticate"] == "Bearer"
    assert await memory_store.all_policies() == []


async def test_an_unauthenticated_body_is_never_read(client: httpx.AsyncClient) -> None:
    """Even a body that is no JSON, or too large, is answered 401 (not 413 or 422)."""
    r = await client.put(
        "/v1/policies/m", content=b"x" * 10_000, headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 401


async def test_read_tokens_read_and_admin_tokens_read_and_write(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.put("/v1/policies/m", json=policy_body(), headers=auth())).is_success
    for token in (READER, ADMIN):
        for path in ("/v1/policies", "/v1/policies/m", "/v1/policies/m/status", "/v1/replicas"):
            r = await client.get(path, headers=auth(token))
            assert r.status_code == 200, (token, path, r.text)


async def test_named_tokens_are_logged_by_name(
    memory_store: MemoryStore, no_redis: NoRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mlproxy.audit")
    secret = "ops-secret-0123456789"
    app = create_app(settings(admin_tokens=(Token("ops", secret),)), memory_store)
    async with api_client(app) as client:
        r = await client.put("/v1/policies/m", json=policy_body(), headers=auth(secret))
        assert r.status_code == 201
    [line] = audit_lines(caplog)
    assert line["token"] == "ops" and secret not in caplog.text


def audit_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "mlproxy.audit"]


async def test_every_write_leaves_one_audit_line(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mlproxy.audit")
    v = (await client.put("/v1/policies/m", json=policy_body(), headers=auth())).json()["version"]
    await client.put(
        "/v1/policies/m", json=policy_body(max_batch_size=4), headers={**auth(), "If-Match": '"0"'}
    )
    await client.put("/v1/policies/m?dry_run=true", json=policy_body(), headers=auth())
    await client.put("/v1/policies/m", json=policy_body(max_batch_size=4), headers=auth())
    await client.put("/v1/policies/m", json=policy_body(), headers=auth(READER))
    await client.put("/v1/policies/m", json=policy_body())
    await client.put("/v1/policies/m?dry_run=yes", json={"colour": "red"}, headers=auth())
    await client.delete("/v1/policies/m", headers=auth())
    await client.get("/v1/policies/m", headers=auth())  # a read: no line
    lines = audit_lines(caplog)
    assert [(a["event"], a["status"], a["token"], a["policy"]) for a in lines] == [
        ("policy.put", 201, "admin-1", "m"),
        ("policy.put", 412, "admin-1", "m"),
        ("policy.put", 200, "admin-1", "m"),
        ("policy.put", 200, "admin-1", "m"),
        ("policy.put", 403, "read-1", "m"),
        ("policy.put", 401, None, "m"),
        ("policy.put", 422, "admin-1", "m"),
        ("policy.delete", 204, "admin-1", "m"),
    ]
    created, stale, dry, changed, *_, invalid, deleted = lines
    assert (created["old_version"], created["new_version"]) == (None, v)
    assert "batching" in created["changed"]
    assert stale["old_version"] == v and "new_version" not in stale
    assert dry["dry_run"] is True and dry["old_version"] == v and "new_version" not in dry
    assert changed["changed"] == ["batching"] and changed["new_version"] > v
    assert invalid["dry_run"] is True
    assert deleted["old_version"] == changed["new_version"] and deleted["changed"] == []
    assert all(ADMIN not in json.dumps(a) and READER not in json.dumps(a) for a in lines)
    assert all(a["source"] == "127.0.0.1:123" for a in lines)  # httpx's ASGI client address
