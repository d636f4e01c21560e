"""The fleet tuner's leader lease on a real Redis: one holder at a time, renewal, take-over
after the TTL, fenced writes, and two control plane processes where the leader is killed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from controlplane.adapters.lease import MAX_LEASE_S, RedisLease
from controlplane.adapters.redis_store import LeaseLost, RedisStore
from controlplane.domain.records import Precondition
from mlproxy.stack import Child, http_ok
from mlproxy_common import ports
from mlproxy_kernel import keys
from tests.conftest import RedisServer
from tests.waiting import eventually

DB = 6
TOKEN = "lease-test-admin-token-0123456789"


def _body() -> dict[str, object]:
    return {
        "match": {"path": "/v1/models/m:predict"},
        "backend": {"url": "http://model/v1/models/m:predict"},
    }


async def test_one_holder_at_a_time_renewal_and_take_over_after_the_ttl(
    store: RedisStore,
) -> None:
    a = RedisLease(store.redis, "a", ttl=0.3)
    b = RedisLease(store.redis, "b", ttl=0.3)
    assert await a.hold() == 1
    assert await b.hold() is None  # taken
    for _ in range(4):  # a renews within the TTL: it keeps the lease past several TTLs
        await asyncio.sleep(0.15)  # time passing: half a TTL
        assert await a.hold() == 1
        assert await b.hold() is None
    assert await a.current() == ("a", 1)
    await asyncio.sleep(0.4)  # a stops renewing (dead, paused): the lease runs out
    assert await b.hold() == 2  # a new term
    assert await a.hold() is None  # a finds out at its next turn
    assert a.token is None and await b.current() == ("b", 2)
    await b.release()  # shutting down: free at once, no wait for the TTL
    assert await a.hold() == 3


async def test_writes_are_fenced_by_the_lease(store: RedisStore) -> None:
    a = RedisLease(store.redis, "a", ttl=0.2)
    b = RedisLease(store.redis, "b", ttl=5)
    assert await a.hold() == 1
    fence = a.fence
    assert fence is not None
    stored = await store.put("p", _body(), Precondition(), fence=fence)  # a leads: written
    await asyncio.sleep(0.3)  # time passing: a pauses past its TTL
    assert await b.hold() == 2  # b leads now
    with pytest.raises(LeaseLost):  # a wakes up and writes under its old term: refused
        await store.put("p", _body(), Precondition.at(stored.version), fence=fence)
    assert (await store.get("p")).version == stored.version  # nothing written


async def test_a_lease_no_control_plane_wrote_is_taken_over_and_said_so(
    store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Red team 2: the ext_proc Redis user (Redis 6.2 has no per-key write selectors) wrote
    the lease without a TTL, and no control plane led the tuner again. Control planes write
    the lease only with a TTL of at most MLPROXY_TUNER_LEASE_S's bound: one without a TTL,
    or with a longer one, is taken over at the next round (a new term), with an error that
    says what to check. One with a TTL a control plane gives is left to its holder."""
    a = RedisLease(store.redis, "a", ttl=5)
    for forged in ({}, {"px": round(MAX_LEASE_S * 1000) + 60_000}):
        await store.redis.set(keys.TUNER_LEASE, "red-team|999999", **forged)  # type: ignore[arg-type]
        caplog.clear()
        assert await a.current() == ("red-team", 999999)
        token = await a.hold()
        assert token is not None and token > 999999  # terms never go back
        assert await a.current() == ("a", token)
        assert "no TTL or one over 3600 s" in caplog.text
        await a.release()
    await store.redis.set(keys.TUNER_LEASE, "b|7", px=2000)  # another control plane's
    assert await a.hold() is None
    assert await a.current() == ("b", 7)
    # a value no control plane writes is shown, never a failed read
    for junk in ("no-bar", "x|not-a-term", "y|-5", "z|" + "9" * 40):
        await store.redis.set(keys.TUNER_LEASE, junk, px=2000)
        holder, term = await a.current()
        assert term == 0 and holder in (junk, junk.rpartition("|")[0])
    await store.redis.delete(keys.TUNER_LEASE)


def _status(port: int) -> dict[str, object]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/tuner", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        data: dict[str, object] = json.loads(resp.read())
        return data


def test_two_control_planes_one_tuner_and_a_take_over_when_the_leader_dies(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    cp_ports = [ports.reserve(), ports.reserve()]
    children = [
        Child(
            f"cp-{i}",
            [sys.executable, "-m", "mlproxy.cli", "controlplane", "--port", str(port)],
            tmp_path / f"cp-{i}.log",
            env={
                "MLPROXY_REDIS_URL": redis_server.url(DB + 1),
                "MLPROXY_ADMIN_TOKENS": TOKEN,
                "MLPROXY_TUNER_INTERVAL_S": "0.1",
                "MLPROXY_TUNER_LEASE_S": "1",
            },
            ready=lambda port=port: http_ok(f"http://127.0.0.1:{port}/readyz"),  # type: ignore[misc]
        )
        for i, port in enumerate(cp_ports)
    ]
    try:
        for child in children:
            child.start()
        for child in children:
            child.wait_ready(30)
        statuses: list[dict[str, object]] = []

        def someone_leads() -> bool:
            statuses[:] = [_status(p) for p in cp_ports]
            return any(s["leading"] for s in statuses)

        # one of them takes the lease within a round or two
        eventually(someone_leads, 10, lambda: f"a leader (statuses: {statuses})")
        leaders = [i for i, s in enumerate(statuses) if s["leading"]]
        assert len(leaders) == 1, statuses
        leader = leaders[0]
        other = 1 - leader
        assert statuses[other]["leader"] == statuses[leader]["this"]  # both see the same
        for _ in range(10):  # and it stays so while both run and renew
            time.sleep(0.05)  # time passing: half a tuner round
            assert [_status(p)["leading"] for p in cp_ports].count(True) == 1
        term = statuses[leader]["term"]
        proc = children[leader].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)  # no chance to give the lease up
        took = eventually(lambda: _status(cp_ports[other])["leading"], 5, "the take-over")
        status = _status(cp_ports[other])
        assert status["leading"] and status["term"] == term + 1  # type: ignore[operator]
        # within the lease (1 s) plus a round (0.1 s), and some slack for a busy machine
        assert took < 2.5, took
    finally:
        for child in children:
            child.stop()
