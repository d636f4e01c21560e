"""Red team 5: attacks on the fixes of c1a6567..e6eccb6 (peer keys, the fleet bound, the tuner
lease, backend-slot fairness by client), on real processes. Each is marked
xfail(strict=True) until it is fixed; each fails on the code it was found on."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from controlplane.adapters.lease import MAX_TERM, RedisLease
from controlplane.adapters.redis_store import RedisStore
from controlplane.domain.records import Precondition
from mlproxy_kernel import keys
from tests.conftest import RedisServer
from tests.e2e.conftest import echo_policy
from tests.e2e.test_envoy import ext_proc_metric
from tests.e2e.test_redteam import envoy_and_one_replica, post_as
from tests.e2e.test_redteam2 import OrderBackend
from tests.e2e.test_redteam4 import peered_replica_stall
from tests.servers import EchoBackend
from tests.waiting import eventually_async

pytestmark = pytest.mark.e2e

DB = 12  # the `store` fixture's database: this module's own
TOKEN = b"red-team-5 fleet token 0123456789"


async def test_peer_keys_with_huge_names_do_not_stall_the_replicas_event_loop(
    store: RedisStore, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Finding: the red team 4 fix reads only `mlproxy:peer:*` keys, each with GETRANGE up to
    `keys.MAX_PEER_BYTES`, so no bulky value is fetched or parsed. But a key's *name* is
    unbounded (Redis allows 512 MB), and every heartbeat takes each name from SCAN, sends it
    back in a GETRANGE (a pipeline of 100 at once, packed and written on the event loop),
    decodes it and HMACs it in `check_member`. A Redis writer (the ext_proc user may SET any
    mlproxy:* key) that writes 100 peer keys with 1 MB names (100 SETs, any short value)
    stalls every replica's event loop for ~1 s a heartbeat (measured 1.05 s; 40 such keys:
    0.13 s), as the 40 bulky records did before the fix. The fix would skip names longer than
    a replica id can be before reading them (and bound what the control plane's
    `RedisStore.replicas()` reads the same way). Measured as the loop's CPU time between two
    turns of a 5 ms timer.
    Fixed: names over keys.MAX_KEY_NAME_BYTES are skipped unread (mlproxy_common/redis_scan.py),
    and a scan stops after keys.MAX_SCANNED_NAME_BYTES of names, with a warning."""
    value = b'{"peer_address":"127.0.0.1:1","peer_signature":"1.ab"}'
    pad = "x" * (1 << 20)
    for i in range(100):
        await store.redis.set(keys.peer_key(f"{i}-{pad}"), value, px=60_000)
    try:
        worst = await peered_replica_stall(redis_server.url(DB), tmp_path, 7511, TOKEN)
        assert worst < 0.1, f"the event loop worked {worst:.3f} s without a turn"
    finally:
        await store.redis.flushdb()


async def test_a_large_term_counter_does_not_stop_the_tuner(store: RedisStore) -> None:
    """Finding: `_TAKE` builds the lease value in Lua as `ARGV[1] .. '|' .. token`. Redis 6.2's
    Lua numbers are doubles formatted with "%.14g", so from 10^14 on a term is written as
    "1e+14" (and rounded), far below the 2^53 that `current()` guards against. A Redis writer
    sets `mlproxy:tuner:term` to 100000000000000 (a valid integer, no junk): the next take
    returns term 100000000000001 to Python but stores `holder|1e+14` in Redis, so the
    holder's RENEW (GET == "holder|100000000000001") fails at once ("tuner lease lost"), the
    fenced writes of its round are refused (LeaseLost), and the lease is retaken every TTL
    with the same result. Terms never go back (the store's term floor raises the counter
    again if an operator deletes it), so the fleet tuner stays stopped until every control
    plane restarts and the key is fixed by hand. `current()` shows the holder as
    'a|1e+14' with term 0. Fixed: terms are written with '%d'."""
    await store.check()
    await store.redis.set(keys.TUNER_TOKEN, str(10**14))  # the ext_proc user may SET this
    lease = RedisLease(store.redis, "a", ttl=5)
    token = await lease.hold()
    assert token is not None
    try:
        assert await lease.hold() == token, "the holder could not renew its own lease"
        assert await lease.current() == ("a", token)
        fence = lease.fence
        assert fence is not None
        body = {
            "match": {"path": "/v1/models/m:predict"},
            "backend": {"url": "http://model/v1/models/m:predict"},
        }
        await store.put("p", body, Precondition(), fence=fence)  # the leader's write lands
    finally:
        await lease.release()
        await store.redis.flushdb()


async def test_a_term_counter_no_control_plane_writes_stops_the_tuner_loudly_until_deleted(
    store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    """A counter that is no integer, or beyond the terms Lua counts exactly (MAX_TERM), cannot
    give a term: the control plane says so (what to delete) and takes no lease, rather than
    failing its rounds with a traceback or taking a term it cannot write; once the keys are
    deleted it leads again, above the highest term it saw."""
    lease = RedisLease(store.redis, "a", ttl=5)
    for junk in ("junk", str(MAX_TERM), str(2**63 - 1)):
        await store.redis.set(keys.TUNER_TOKEN, junk)
        caplog.clear()
        # the store's status still reads (a junk counter as none)
        assert (await store.info()).term == (MAX_TERM if junk == str(MAX_TERM) else 0)
        assert await lease.hold() is None
        assert "term counter in Redis (mlproxy:tuner:term) is unusable" in caplog.text
        assert await store.redis.get(keys.TUNER_LEASE) is None  # nothing taken
    await store.redis.delete(keys.TUNER_TOKEN)
    try:
        assert await lease.hold() == 1
    finally:
        await lease.release()
        await store.redis.flushdb()


async def test_a_large_term_counter_below_1e14_is_fine(store: RedisStore) -> None:
    """Control for the finding above: just below 10^14 the lease works."""
    await store.redis.set(keys.TUNER_TOKEN, str(10**14 - 10))
    lease = RedisLease(store.redis, "a", ttl=5)
    token = await lease.hold()
    try:
        assert token == 10**14 - 9
        assert await lease.hold() == token
        assert await lease.current() == ("a", token)
    finally:
        await lease.release()
        await store.redis.flushdb()


async def test_fresh_client_identities_cannot_jump_ahead_of_a_waiting_client(
    echo_backend: EchoBackend, tmp_path: Path
) -> None:
    """Finding: `RouteGroup.turns` orders queues by when their head request's client was last
    in a batch, and a client not remembered counts as 0: older than every client ever
    served. A client's identity is its source IP (or mTLS SAN), and an attacker with many
    addresses (an IPv6 /64 is 2^64 of them; here loopback 127.0.1.x) that sends each request
    from a new one always beats every client that has been served once. Policy `fair1` allows
    one batch of one request at a time. A normal client (127.0.0.3) has a request at the
    backend (1.5 s) and queues its second, `n-1`; after it, a flooder queues 30 requests
    (another top-level `nonce`: its own queue) from 30 new addresses. Every one of them went
    before `n-1`, which waited longest and was served last (with a continuous flood from new
    addresses, it would wait until its deadline). The round robin by queue that this
    replaced served `n-1` next. Fixed: a client not remembered counts as served when its
    request is queued (`RouteGroup.seen`), not before everyone."""
    backend = OrderBackend()
    backend.start()
    try:
        fair1 = echo_policy(
            "fair1",
            backend.url,
            batching={"max_batch_size": 1, "max_wait_ms": 1, "max_in_flight": 1},
            backend={"timeout_ms": 10_000},
            sla={"latency_ms": 30_000},
        )
        with envoy_and_one_replica(echo_backend, tmp_path, [fair1]) as stack:
            url = f"{stack.envoy_url}/v1/models/fair1:predict"

            # the normal client's first request holds the backend's one slot for 1.5 s
            tasks = [asyncio.create_task(post_as("127.0.0.3", url, {"instances": ["slow-0"]}))]
            await backend.wait_calls(1)
            tasks.append(asyncio.create_task(post_as("127.0.0.3", url, {"instances": ["n-1"]})))
            await eventually_async(  # n-1 waits first
                lambda: ext_proc_metric(stack, 'mlproxy_queue_depth{policy="fair1"}') == 1,
                10,
                "n-1 queued",
            )
            tasks += [
                asyncio.create_task(
                    post_as(f"127.0.1.{10 + i}", url, {"instances": [f"x{i}"], "nonce": "a"})
                )
                for i in range(30)
            ]
            results = await asyncio.gather(*tasks)
    finally:
        backend.stop()
    assert all(code == 200 for code, _, _ in results), results
    order = [call[0] for call in backend.calls]
    assert order[0] == "slow-0", order
    assert order.index("n-1") <= 4, order
