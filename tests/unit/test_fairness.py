"""Per-client shares of a policy's queue: the pure rule, and the runtime acting on it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from extproc.core.fairness import ClientShares
from extproc.runtime.replies import Reply
from tests.unit.test_runtime import Harness, codec, make_policy


def test_a_lone_client_may_use_the_whole_queue() -> None:
    shares: ClientShares[int] = ClientShares()
    for i in range(10):
        assert shares.admit("p", "a", 10).admit
        shares.add("p", "a", i)
    assert not shares.admit("p", "a", 10).admit
    assert shares.queued("p") == 10 and shares.queued("p", "a") == 10


def test_when_full_a_light_client_takes_the_heaviest_clients_newest_place() -> None:
    shares: ClientShares[str] = ClientShares()
    for i in range(8):
        shares.add("p", "heavy", f"h{i}")
    shares.add("p", "mid", "m0")
    shares.add("p", "mid", "m1")
    admission = shares.admit("p", "light", 10)
    assert admission.admit and admission.evict == "h7"
    assert shares.admit("p", "heavy", 10).admit is False  # the heaviest is refused
    # 'mid' holds 2, heavy 8: mid may still take heavy's place
    assert shares.admit("p", "mid", 10).evict == "h7"


def test_no_eviction_between_clients_holding_nearly_the_same() -> None:
    shares: ClientShares[str] = ClientShares()
    for c in "ab":
        for i in range(5):
            shares.add("p", c, f"{c}{i}")
    assert not shares.admit("p", "a", 10).admit
    shares.remove("p", "a", "a4")
    shares.add("p", "b", "b5")  # a 4, b 6: a may take b's newest
    assert shares.admit("p", "a", 10).evict == "b5"


def test_policies_are_independent_and_remove_is_idempotent() -> None:
    shares: ClientShares[int] = ClientShares()
    shares.add("p", "a", 1)
    shares.add("q", "a", 2)
    assert shares.remove("p", "a", 1)
    assert not shares.remove("p", "a", 1)
    assert shares.queued("p") == 0 and shares.queued("q") == 1 and shares.clients("p") == 0


@given(
    st.lists(
        st.tuples(st.sampled_from("abcd"), st.booleans()),
        max_size=200,
    )
)
def test_the_queue_never_exceeds_its_bound_and_a_fair_client_is_never_refused(
    ops: list[tuple[str, bool]],
) -> None:
    """Random arrivals (True) and departures (False, the client's oldest request): the total
    stays within max_queue, and a client holding less than an even share is always admitted."""
    limit = 12
    shares: ClientShares[int] = ClientShares()
    held: dict[str, list[int]] = {c: [] for c in "abcd"}
    for n, (client, arrive) in enumerate(ops):
        if arrive:
            fair = shares.queued("p", client) < limit // max(1, shares.clients("p") + 1) - 1
            admission = shares.admit("p", client, limit)
            if fair:
                assert admission.admit
            if admission.evict is not None:
                victim = next(c for c in held if admission.evict in held[c])
                assert victim != client
                held[victim].remove(admission.evict)
                shares.remove("p", victim, admission.evict)
            if admission.admit:
                shares.add("p", client, n)
                held[client].append(n)
        elif held[client]:
            shares.remove("p", client, held[client].pop(0))
        assert shares.queued("p") <= limit
        assert shares.queued("p") == sum(len(v) for v in held.values())


def submit_as(h: Harness, client: str, ident: Any) -> asyncio.Future[Reply]:
    route = h.router.resolve("/v1/models/m:predict")
    assert route is not None
    fut: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
    body = json.dumps({"instances": [{"id": ident}]}).encode()
    try:
        h.pool.submit(route, codec.parse(body), fut, client=client)
    except Exception as err:  # queue full: as the servicer answers it
        fut.set_exception(err)
    return fut


async def test_a_client_filling_the_queue_gets_the_429s_not_the_others() -> None:
    h = Harness(make_policy(max_queue=10, max_batch_size=100))  # max_wait 60 s: nothing leaves
    flood = [submit_as(h, "flooder", f"f{i}") for i in range(30)]
    polite = [submit_as(h, f"client-{i}", f"p{i}") for i in range(4)]
    await asyncio.sleep(0)
    refused = [f for f in flood if f.done()]
    assert len(refused) == 20 + 4  # 20 never queued, 4 made room for the polite clients
    assert not any(f.done() for f in polite)
    evicted = [f.result() for f in refused if f.exception() is None]
    assert len(evicted) == 4
    assert all(r.status == 429 and ("retry-after", "1") in r.headers for r in evicted)
    assert "your client holds more of it" in json.loads(evicted[0].body)["error"]
    await h.pool.drain()  # the queued ones are sent and answered with their own results
    for i, f in enumerate(polite):
        assert json.loads(f.result().body)["predictions"] == [{"echo": f"p{i}"}]
    answered = [f for f in flood if f not in refused]
    assert len(answered) == 6
    assert {json.loads(f.result().body)["predictions"][0]["echo"] for f in answered} == {
        f"f{i}" for i in range(6)
    }
    assert h.pool._shares.queued("echo") == 0


def test_client_identity_prefers_the_verified_certificate_then_the_peer_ip() -> None:
    from extproc.adapters.servicer import client_identity

    san = "spiffe://cluster.local/ns/a/sa/b"
    assert client_identity({"connection.uri_san_peer_certificate": san}) == f"san:{san}"
    assert (
        client_identity(
            {"connection.uri_san_peer_certificate": "", "source.address": "10.1.2.3:5555"}
        )
        == "ip:10.1.2.3"
    )
    assert client_identity({"source.address": "[::1]:40000"}) == "ip:::1"
    assert client_identity({"source.address": "10.1.2.3:1"}) == client_identity(
        {"source.address": "10.1.2.3:2"}
    )
    assert client_identity({}) == ""
