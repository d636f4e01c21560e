"""The replica's Redis policy source on a real Redis: push, resync, partitions, heartbeats."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import pytest

from controlplane.adapters.redis_store import RedisStore
from controlplane.domain.records import Precondition
from extproc.adapters.metrics import PrometheusMetrics
from extproc.adapters.peers import Peering, PeerSettings, check_member, sign_member
from extproc.adapters.redis_source import RedisPolicySource
from extproc.core.clock import MonotonicClock
from extproc.core.stats import StatsWindow
from mlproxy_kernel import keys
from mlproxy_kernel.policy import Policy, Router
from tests.conftest import RedisServer
from tests.tcp_proxy import TcpProxy
from tests.waiting import eventually_async

DB = 2
T = TypeVar("T")


def body(batch: int) -> dict[str, object]:
    return {
        "match": {"path": "/p"},
        "backend": {"url": "http://b/"},
        "batching": {"max_batch_size": batch},
    }


class Replica:
    """A RedisPolicySource and what it applied."""

    def __init__(
        self,
        url: str,
        rid: str,
        peer_address: str | None = None,
        on_peers: Callable[[list[tuple[str, object, object]], float], None] | None = None,
        sign_peer: Callable[[str, str, float], str] | None = None,
    ) -> None:
        self.policies: dict[str, Policy] = {}
        self.source = RedisPolicySource(
            url,
            rid,
            f"{rid}:1",
            StatsWindow(),
            MonotonicClock(),
            applied=lambda: {n: p.version for n, p in self.policies.items()},
            resync_interval=0.5,
            heartbeat_interval=0.2,
            heartbeat_ttl=1.0,
            peer_address=peer_address,
            on_peers=on_peers,
            sign_peer=sign_peer,
        )

    def apply(self, policies: Sequence[Policy]) -> None:
        self.policies = {p.name: p for p in policies}

    async def start(self) -> None:
        self.apply(await self.source.load())
        self.source.watch(self.apply)


async def test_changes_are_pushed_and_heartbeats_report_them(
    store: RedisStore, redis_server: RedisServer
) -> None:
    await store.put("p", body(4), Precondition())
    replica = Replica(redis_server.url(DB), "r1")
    await replica.start()
    try:
        assert replica.policies["p"].batching.max_batch_size == 4
        p2 = await store.put("p", body(8), Precondition())
        took = await eventually_async(
            lambda: replica.policies["p"].version == p2.version, 5, "the change applied"
        )
        assert took < 0.5  # pushed, not waiting for the periodic resync

        async def reported() -> bool:
            return [r.policies for r in await store.replicas()] == [{"p": p2.version}]

        await eventually_async(reported, 5, "a heartbeat reporting the new version")
        (record,) = await store.replicas()
        assert (record.id, record.address, record.source_ok) == ("r1", "r1:1", True)
        assert record.policies == {"p": p2.version}
        await store.delete("p", Precondition())
        await eventually_async(lambda: "p" not in replica.policies, 5, "the deletion applied")
    finally:
        await replica.source.close()
    assert await store.redis.get(keys.replica_key("r1")) is None  # removed on close


async def within(aw: Awaitable[T], seconds: float, what: str) -> T:
    try:
        return await asyncio.wait_for(aw, seconds)
    except TimeoutError:
        pytest.fail(f"{what} took over {seconds} s")


# The test's TCP proxy (tests/tcp_proxy.py) can leave one accepted socket to the garbage
# collector when the replica's reconnect races the cut (Python 3.11's Server.wait_closed does
# not wait for connections); instrumenting the transports showed it is always the proxy's own
# accepted side, never a connection of MLProxy's.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
async def test_cut_off_replica_keeps_serving_and_catches_up_after_reconnect(
    store: RedisStore, redis_server: RedisServer
) -> None:
    await store.put("p", body(4), Precondition())
    proxy = TcpProxy("127.0.0.1", redis_server.port)
    await proxy.start()
    replica = Replica(f"redis://127.0.0.1:{proxy.port}/{DB}", "cut")
    await within(replica.start(), 5, "first load")
    try:
        await eventually_async(lambda: replica.source.source_ok, 5, "the source up")
        await within(proxy.cut(), 2, "cut")
        await eventually_async(lambda: not replica.source.source_ok, 5, "the cut noticed")
        changed = await store.put("p", body(16), Precondition())  # made while cut off
        await asyncio.sleep(0.7)  # time passing: over a resync interval (0.5 s) while cut off
        assert replica.policies["p"].batching.max_batch_size == 4  # last-known, still serving
        await within(proxy.start(), 2, "heal")  # the partition heals
        await eventually_async(
            lambda: replica.policies["p"].version == changed.version, 10, "the catch-up"
        )
        assert replica.source.source_ok
    finally:
        await within(replica.source.close(), 5, "close")
        await within(proxy.cut(), 2, "final cut")
        # Let connections accepted during the cut finish closing, and collect what is left
        # here, so that a stray socket is reported (and filtered) in this test, not in
        # whichever test the garbage collector happens to run in next.
        await asyncio.sleep(0.1)
        gc.collect()


async def test_heartbeat_expires_when_a_replica_dies(
    store: RedisStore, redis_server: RedisServer
) -> None:
    replica = Replica(redis_server.url(DB), "dying")
    await replica.start()
    await eventually_async(lambda: replica.source.source_ok, 5, "the source up")

    async def ids() -> list[str]:
        return [r.id for r in await store.replicas()]

    await eventually_async(ids, 5, "the first heartbeat record")
    assert await ids() == ["dying"]
    for task in replica.source._tasks:  # dies without cleaning up
        task.cancel()
    await asyncio.sleep(1.3)  # past the TTL
    assert await store.replicas() == []
    await replica.source._redis.aclose()


async def test_an_unreadable_record_does_not_remove_the_policy(
    store: RedisStore, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    await store.put("p", body(4), Precondition())
    replica = Replica(redis_server.url(DB), "r")
    await replica.start()
    try:
        with caplog.at_level(logging.ERROR, logger="extproc.adapters.redis_source"):
            await store.redis.hset(keys.POLICIES, "p", json.dumps({"name": "p", "garbage": True}))
            await store.redis.publish(keys.CHANGES, "{}")
            # a resync has read the garbage (and applied what it kept)
            await eventually_async(
                lambda: "policy p in Redis is invalid here" in caplog.text, 5, "the bad record read"
            )
        assert replica.policies["p"].batching.max_batch_size == 4
    finally:
        await replica.source.close()


async def test_heartbeats_carry_the_peer_address_and_every_beat_reads_the_live_ones(
    store: RedisStore, redis_server: RedisServer
) -> None:
    """Peer discovery (docs/adaptive-batching.md, "Fleets: one owner per model"): each
    replica's record holds its peer address, signed at every beat; every heartbeat hands the
    live records' (id, peer_address, peer_signature) to the fleet with the heartbeat TTL,
    skipping what is not a record (oversized, not JSON, not an object)."""
    seen: list[dict[str, object]] = []
    signatures: dict[str, object] = {}
    ttls: set[float] = set()

    def on_peers(records: list[tuple[str, object, object]], ttl: float) -> None:
        # what Peering.update receives
        seen.append({rid: address for rid, address, _ in records})
        signatures.update({rid: sig for rid, _, sig in records})
        ttls.add(ttl)

    def signer(rid: str, address: str, at: float) -> str:
        return sign_member(b"t" * 16, rid, address, at)

    replica = Replica(redis_server.url(DB), "peer-a", "127.0.0.1:7101", on_peers, signer)
    other = Replica(redis_server.url(DB), "peer-b", "127.0.0.1:7102")
    junk = {
        keys.peer_key("not-json"): b"{nope",
        keys.peer_key("a-list"): b"[1, 2]",
        # one byte over the bound: neither fetched whole nor parsed
        keys.peer_key("huge"): json.dumps(
            {"peer_address": "127.0.0.1:7666", "pad": "x" * (keys.MAX_PEER_BYTES - 44)}
        ).encode(),
        keys.peer_key("hostile"): json.dumps({"peer_address": "attacker.example:1"}).encode(),
        # a key name that is not UTF-8: still read (the fleet refuses it), not a failed beat
        keys.peer_key("").encode() + b"bad\xff": b'{"peer_address": "127.0.0.1:7667"}',
        # a heartbeat record is no peer key: membership never reads (or parses) them
        keys.replica_key("record-only"): b'{"peer_address": "127.0.0.1:7668"}',
    }
    assert len(junk[keys.peer_key("huge")]) == keys.MAX_PEER_BYTES + 1
    await store.redis.mset(junk)  # type: ignore[arg-type]
    await replica.start()
    await other.start()
    try:
        await eventually_async(lambda: bool(seen) and "peer-b" in seen[-1], 10, "peer-b read")
        last = seen[-1]
        assert last["peer-a"] == "127.0.0.1:7101"
        assert last["peer-b"] == "127.0.0.1:7102"
        # read as is (the fleet checks addresses and signatures); what is not a record is
        # skipped
        assert last["hostile"] == "attacker.example:1"
        assert last["bad\ufffd"] == "127.0.0.1:7667"
        assert not {"not-json", "a-list", "huge", "record-only"} & set(last)
        assert ttls == {1.0}
        raw = json.loads(await store.redis.get(keys.replica_key("peer-a")))
        assert raw["peer_address"] == "127.0.0.1:7101"
        # signed at each beat, at the record's heartbeat time; no signer, no signature
        assert raw["peer_signature"] == signatures["peer-a"]
        stamp = int(str(raw["peer_signature"]).partition(".")[0])
        assert abs(stamp / 1000 - datetime.fromisoformat(raw["heartbeat_at"]).timestamp()) < 0.01
        assert (
            check_member(b"t" * 16, "peer-a", "127.0.0.1:7101", signatures["peer-a"], stamp / 1000)
            is None
        )
        assert signatures["peer-b"] is None and signatures["hostile"] is None
        # the peer key carries the record's address and signature, and expires with it
        peer = json.loads(await store.redis.get(keys.peer_key("peer-a")))
        assert peer == {"peer_address": "127.0.0.1:7101", "peer_signature": raw["peer_signature"]}
        assert 0 < await store.redis.pttl(keys.peer_key("peer-a")) <= 1000
        # a replica that stops is gone from the next read
        await other.source.close()
        await eventually_async(lambda: "peer-b" not in seen[-1], 10, "peer-b gone")
    finally:
        await replica.source.close()
        await other.source.close()


def _peering(
    tmp_path: Path, port: int, token: bytes, metrics: PrometheusMetrics | None = None
) -> Peering:
    path = tmp_path / f"token-{port}"
    path.write_bytes(token)
    settings = PeerSettings.build(port, str(path), "127.0.0.1")
    return Peering(settings, Router([]), metrics or PrometheusMetrics(), 1 << 20)


async def test_a_fleet_takes_only_records_signed_with_its_token_as_members(
    store: RedisStore, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Members through a real Redis: replicas sign their records at each heartbeat with the
    fleet token; a record written by someone without it (a Redis writer), or by a replica
    with another token, is no member; that replica, restarted with the fleet's token, is one
    from its first beat."""
    token, rotated = b"fleet-token-0123456789", b"other-token-9876543210"
    url = redis_server.url(DB)
    metrics = PrometheusMetrics()
    a_peering = _peering(tmp_path, 7201, token, metrics)
    beats = 0  # a's heartbeats that read the records

    def a_update(records: list[tuple[str, object, object]], ttl: float) -> None:
        nonlocal beats
        a_peering.update(records, ttl)
        beats += 1

    def rejected(reason: str) -> float:
        found = metrics.registry.get_sample_value(
            "mlproxy_peer_members_rejected_total", {"reason": reason}
        )
        return found or 0.0

    async def more_beats(n: int) -> None:
        """Until `n` more of a's beats are done: the last at least began after this call."""
        target = beats + n
        await eventually_async(lambda: beats >= target, 5, f"{n} more heartbeats of a")

    a = Replica(url, "a", a_peering.address, a_update, a_peering.sign_member)
    b_peering = _peering(tmp_path, 7202, token)
    b = Replica(url, "b", b_peering.address, sign_peer=b_peering.sign_member)
    c_peering = _peering(tmp_path, 7203, rotated)
    c = Replica(url, "c", c_peering.address, sign_peer=c_peering.sign_member)
    forged = {"id": "rogue", "address": "x:1", "peer_address": "127.0.0.1:7299"}
    await store.redis.set(keys.peer_key("rogue"), json.dumps(forged), px=60_000)
    try:
        for r in (a, b, c):
            await r.start()
        await eventually_async(lambda: "127.0.0.1:7202" in a_peering.members, 10, "b a member")
        # c (another token) and the rogue (unsigned) read, and refused; a few more beats
        await eventually_async(
            lambda: rejected("signature") and rejected("unsigned"), 10, "c and the rogue refused"
        )
        await more_beats(2)
        assert a_peering.members == ("127.0.0.1:7201", "127.0.0.1:7202")
        # a genuine record of b, copied as is to another id, and to another address
        genuine = json.loads(await store.redis.get(keys.peer_key("b")))
        await store.redis.set(keys.peer_key("copy"), json.dumps(genuine), px=60_000)
        moved = {**genuine, "peer_address": "127.0.0.1:7298"}
        await store.redis.set(keys.peer_key("b2"), json.dumps(moved), px=60_000)
        refused = rejected("signature")
        await more_beats(2)  # the second began after the copies were written
        assert a_peering.members == ("127.0.0.1:7201", "127.0.0.1:7202")
        assert rejected("signature") >= refused + 3  # c, copy and b2, at that beat
        # c restarts with the fleet's token: a member from its next beat
        await c.source.close()
        c_peering = _peering(tmp_path, 7203, token)
        c = Replica(url, "c", c_peering.address, sign_peer=c_peering.sign_member)
        await c.start()
        await eventually_async(lambda: "127.0.0.1:7203" in a_peering.members, 10, "c a member")
        assert a_peering.members == ("127.0.0.1:7201", "127.0.0.1:7202", "127.0.0.1:7203")
    finally:
        for r in (a, b, c):
            await r.source.close()
        for p in (a_peering, b_peering, c_peering):
            await p.close()
