"""Red team 2 (issue 12): attacks on the first red team's fixes, as regressions through the
real stack. Each is marked xfail(strict=True) until it is fixed; each fails on the code it
was found on."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis

from mlproxy import keys
from mlproxy.stack import Stack
from tests.e2e.test_redteam import process_env

pytestmark = pytest.mark.e2e

DEMO_BODY = {"instances": [[0.5] * 16]}


@pytest.fixture(scope="module")
def doomed_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The stack as `mlproxy up` runs it (Redis with its two ACL users, the control plane
    holding the demo policy, two replicas), for tests that damage its store."""
    stack = Stack(envoy_port=0, replicas=2, run_dir=tmp_path_factory.mktemp("doomed-stack"))
    stack.start()
    yield stack
    dead = stack.dead_child()
    stack.stop()
    assert dead is None, f"{dead.name} died; log:\n{dead.log_tail()}"


def extproc_redis(stack: Stack) -> redis.Redis:
    """A Redis client with ext_proc's own credentials, as a compromised replica has them."""
    env = process_env(stack, "extproc-0")
    password = Path(env["MLPROXY_REDIS_PASSWORD_FILE"]).read_text(encoding="utf-8")
    return redis.Redis(
        port=stack.redis_port,
        username=env["MLPROXY_REDIS_USERNAME"],
        password=password,
        decode_responses=True,
    )


def heartbeat(r: redis.Redis, replica: str) -> dict:
    raw = r.get(keys.replica_key(replica))
    assert raw is not None
    return json.loads(raw)


@pytest.mark.xfail(
    strict=True,
    reason="red team 2: ext_proc's Redis user may DEL mlproxy:policies; every replica then "
    "drops every policy with no reset, no ERROR and a healthy `mlproxy store`",
)
async def test_a_replicas_credentials_cannot_silently_drop_every_policy_of_every_replica(
    doomed_stack: Stack,
) -> None:
    """The README says ext_proc's user can only overwrite or delete a key, "which the store
    generation detects as data loss". Deleting the policies hash (and nothing else) keeps the
    generation: both replicas resync to an empty policy set, the demo model is then served
    unbatched and unchecked (no max_body_bytes, no queue shares), and nothing counts a reset.
    Whatever a replica's credentials can do, the demo policy must still be applied after every
    replica has resynced (or the deletion refused)."""
    stack = doomed_stack
    with extproc_redis(stack) as r:
        try:
            r.delete(keys.POLICIES)
        except redis.exceptions.NoPermissionError:
            return  # refused: nothing to check
        after = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # until each replica synced after the deletion
            beats = {i: heartbeat(r, f"extproc-{i}") for i in range(2)}
            if all(beats[i]["last_sync_at"] > after for i in range(2)):
                break
            time.sleep(0.2)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        for _ in range(4):  # both replicas (Envoy balances round robin)
            async with s.post(f"{stack.envoy_url}/v1/models/demo:predict", json=DEMO_BODY) as resp:
                assert resp.status == 200
                assert "x-mlproxy-batch-size" in resp.headers, "served unbatched, unchecked"
