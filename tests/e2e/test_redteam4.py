"""Red team 4, against real processes: fleet membership read from a real Redis that a Redis
writer without the fleet token (the ext_proc Redis user) fills with hostile records."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from controlplane.adapters.redis_store import RedisStore
from mlproxy_kernel import keys
from tests.conftest import RedisServer
from tests.integration.test_redis_source import Replica, _peering
from tests.waiting import eventually_async

pytestmark = pytest.mark.e2e

DB = 7  # the `store` fixture's database: this module's own
TOKEN = b"red-team-4 fleet token 0123456789"
# JSON nested deeper than Python's parser goes (200 kB: within the 1 MB a record may have)
DEEP = b'{"peer_address":' + b"[" * 100_000 + b"]" * 100_000 + b"}"


async def test_a_record_nested_too_deeply_does_not_freeze_the_fleets_members(
    store: RedisStore,
    redis_server: RedisServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Finding: `peer_records` skipped records that are not JSON (ValueError), but JSON nested
    deeper than the parser's recursion limit raises RecursionError, which is no ValueError:
    one such record (a single SET by the ext_proc Redis user) made every heartbeat's read of
    the records fail ("heartbeat failed", a traceback every 2 s), so no replica updated its
    members again for as long as the record lived. A member that died stayed a member (its
    keys forwarded to its address: a process that later took that IP, e.g. a reused pod IP,
    received the client bodies forwarded to it, long past the 15 s a signed record lives),
    and a replica that joined was never one. Fixed: such a record is skipped like any other
    that is not JSON."""
    url = redis_server.url(DB)
    a_peering = _peering(tmp_path, 7301, TOKEN)
    beats = 0  # a's heartbeats that read the records

    def a_update(records: list[tuple[str, object, object]], ttl: float) -> None:
        nonlocal beats
        a_peering.update(records, ttl)
        beats += 1

    a = Replica(url, "a", a_peering.address, a_update, a_peering.sign_member)
    b_peering = _peering(tmp_path, 7302, TOKEN)
    b = Replica(url, "b", b_peering.address, b_peering.update, b_peering.sign_member)
    c_peering = _peering(tmp_path, 7303, TOKEN)
    c = Replica(url, "c", c_peering.address, c_peering.update, c_peering.sign_member)
    try:
        await a.start()
        await b.start()
        both = ("127.0.0.1:7301", "127.0.0.1:7302")
        await eventually_async(
            lambda: a_peering.members == both == b_peering.members, 10, "a and b members"
        )
        # as a heartbeat record and as a peer key (too long to be one: skipped unparsed)
        await store.redis.set(keys.replica_key("deep"), DEEP, px=120_000)
        await store.redis.set(keys.peer_key("deep"), DEEP, px=120_000)
        await store.redis.set(keys.peer_key("deep-short"), b"[" * 1024, px=120_000)
        target = beats + 3  # a few beats read it (the second at the latest began after the SETs)
        await eventually_async(lambda: beats >= target, 10, "three more heartbeats of a")
        # a member leaves (its record deleted at once), another joins
        await b.source.close()
        await c.start()
        now = ("127.0.0.1:7301", "127.0.0.1:7303")
        await eventually_async(
            lambda: a_peering.members == now == c_peering.members, 10, "a and c members"
        )
        assert "heartbeat failed" not in caplog.text
    finally:
        for r in (a, b, c):
            await r.source.close()
        for p in (a_peering, b_peering, c_peering):
            await p.close()


async def peered_replica_stall(url: str, tmp_path: Path, port: int, token: bytes) -> float:
    """A peered replica (peer port `port`) runs against the Redis at `url` for 3 s of its
    heartbeats: how long, at worst, its event loop (the one that answers Envoy) could not
    serve, as `worst_loop_work` measures it."""
    peering = _peering(tmp_path, port, token)
    replica = Replica(url, "a", peering.address, peering.update, peering.sign_member)
    try:
        await replica.start()
        return await worst_loop_work(3.0)
    finally:
        await replica.source.close()
        await peering.close()


async def worst_loop_work(seconds: float) -> float:
    """The most CPU time this event loop's thread spent between two turns of a 5 ms timer,
    over `seconds`: how long, at worst, one piece of work kept the loop that answers Envoy
    from serving. CPU time, not the timer's lateness: on a loaded machine the timer fires
    late while the loop does nothing (two busy processes on these two cores made it 0.29 s
    late, with the fix in place)."""
    loop = asyncio.get_running_loop()
    worst, end = 0.0, loop.time() + seconds
    while loop.time() < end:
        before = time.thread_time()
        await asyncio.sleep(0.005)
        worst = max(worst, time.thread_time() - before)
    return worst


# A record of small JSON objects just under the 1 MB a record may have: about 20 ms of the
# event loop's time for json.loads on this machine; and a peer key as slow to parse as one
# within its bound (keys.MAX_PEER_BYTES) gets.
BULKY = b'{"peer_address":"127.0.0.1:1","pad":[' + b",".join([b"{}"] * 330_000) + b"]}"
BULKY_PEER = b'{"peer_address":"127.0.0.1:1","pad":[' + b",".join([b"{}"] * 328) + b"]}"


async def test_a_flood_of_bulky_records_does_not_stall_the_replicas_event_loop(
    store: RedisStore, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Finding (red team 4): every heartbeat parsed each live replica record in full (up to
    1024 of up to 1 MB) on the event loop that answers Envoy, to read two short fields: 40
    records of 1 MB of '{}' (one MSET by the ext_proc Redis user) stalled it ~1 s a beat.
    Fixed: membership reads only the small peer keys (`mlproxy:peer:*`), each with GETRANGE
    up to 1 kB, and yields between chunks. Here a Redis writer fills both: 40 bulky records
    and 1024 peer keys as slow to parse as the bound allows. The loop must keep serving:
    measured as the loop's CPU time between two turns of a 5 ms timer."""
    assert len(BULKY) < 1 << 20 and len(BULKY_PEER) <= keys.MAX_PEER_BYTES
    await store.redis.mset({keys.replica_key(f"bulky-{i}"): BULKY for i in range(40)})
    await store.redis.mset({keys.peer_key(f"bulky-{i}"): BULKY_PEER for i in range(1024)})
    try:
        worst = await peered_replica_stall(redis_server.url(DB), tmp_path, 7311, TOKEN)
        assert worst < 0.1, f"the event loop worked {worst:.3f} s without a turn"
    finally:
        await store.redis.flushdb()
