"""Red team 3: owner forwarding between ext_proc replicas, attacked through the real stack
(Redis, the control plane, 2 ext_proc replicas with peering on, an Envoy in front of each).

The attacker here is the one the threat model names: whoever can write `mlproxy:*` keys in
Redis (the ext_proc Redis user can), plus a process listening on an address inside
--peer-networks (on a real fleet: any pod of the pod network; here: loopback). It writes a
replica record whose peer address is its own listener, so that the replicas elect it owner of
some batching keys and forward those keys' requests to it (refused: it cannot sign the record
with the fleet token).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from extproc.adapters.peers import (
    PEER_SERVICE,
    ForwardRequest,
    batching_key,
    encode_reply,
    sign_member,
)
from extproc.core.owner import owner
from extproc.runtime.replies import Reply
from mlproxy.client import Client
from mlproxy.stack import Stack
from mlproxy_kernel import keys
from tests.e2e.test_peering import ConnectionRecorder, echo_policy, start_envoy
from tests.servers import EchoBackend
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

REPLICAS = 2
FORGED = b'{"predictions":[{"echo":"forged by the rogue owner"}]}'


class RogueOwner:
    """A gRPC server on loopback that speaks the peer protocol without the fleet token: it
    keeps every forwarded frame it receives and answers each with a forged reply."""

    def __init__(self) -> None:
        self.received: list[ForwardRequest] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.method_handlers_generic_handler(
            PEER_SERVICE, {"Forward": grpc.unary_unary_rpc_method_handler(self._forward)}
        )
        self.server.add_generic_rpc_handlers((handler,))
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        self.server.start()

    def _forward(self, raw: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.received.append(ForwardRequest.decode(raw))
        return encode_reply(Reply(200, FORGED), 0.001)

    def close(self) -> None:
        self.server.stop(0).wait(5)


class Fleet2:
    def __init__(self, stack: Stack, api: Client, envoys: list[str]) -> None:
        self.stack, self.api, self.envoys = stack, api, envoys

    def members(self) -> list[str]:
        return [f"127.0.0.1:{p}" for p in self.stack.peer_ports]

    def metric(self, i: int, name: str, **labels: str) -> float:
        from tests.e2e.test_peering import replica_metric

        return replica_metric(self.stack, i, name, **labels)

    def redis(self) -> Any:
        import redis

        assert self.stack.security is not None
        password = self.stack.security.redis_password_file.read_text(encoding="utf-8")
        return redis.Redis(port=self.stack.redis_port, username="mlproxy", password=password)


@pytest.fixture(scope="module")
def fleet2(tmp_path_factory: pytest.TempPathFactory, echo_backend: EchoBackend) -> Iterator[Fleet2]:
    stack = Stack(
        envoy_port=0,
        replicas=REPLICAS,
        controlplane_port=0,
        seed_demo=False,
        peer_networks="127.0.0.1/32",
        run_dir=tmp_path_factory.mktemp("redteam3"),
    )
    assert stack.peering
    try:
        stack.start(timeout=60)
        api = Client(stack.controlplane_url, stack.admin_token)
        policy = echo_policy(echo_backend, wait_ms=20)
        api.put_policy("peered", policy)
        brisk = echo_policy(echo_backend, "{model}", wait_ms=20)
        brisk["match"] = {"path": "/v1/brisk/{model}:predict"}
        brisk["sla"] = {"latency_ms": 300, "percentile": 99}
        brisk["backend"]["timeout_ms"] = 1000
        api.put_policy("brisk", brisk)
        # adaptive, an SLA longer than the backend's timeout
        lazy = echo_policy(echo_backend, "{model}")
        lazy["match"] = {"path": "/v1/lazy/{model}:predict"}
        lazy["backend"]["timeout_ms"] = 300
        lazy["sla"] = {"latency_ms": 1500, "percentile": 99}
        lazy["batching"] = {"mode": "adaptive", "max_batch_size": 64, "max_in_flight": 4}
        api.put_policy("lazy", lazy)
        names = ("peered", "brisk", "lazy")
        eventually(lambda: all(rolled_out_n(api, n) for n in names), 30, "rollout")
        envoys = [start_envoy(stack, i) for i in range(REPLICAS)]
        fleet = Fleet2(stack, api, envoys)
        eventually(
            lambda: all(
                fleet.metric(i, "mlproxy_peer_members") == REPLICAS for i in range(REPLICAS)
            ),
            30,
            "every replica sees the members",
        )
        yield fleet
    finally:
        dead = stack.dead_child()
        stack.stop()
        stack.release_ports()
    assert dead is None, f"{dead.name} died; log:\n{dead.log_tail()}"


def rolled_out_n(api: Client, name: str) -> bool:
    try:
        status = api.status(name)
    except Exception:
        return False
    return bool(status["complete"] and status["replicas"] == REPLICAS)


async def post(
    url: str,
    model: str,
    rid: str,
    query: str = "",
    headers: dict[str, str] | None = None,
    policy: str = "peered",
) -> tuple[int, bytes]:
    import aiohttp

    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.post(
            f"{url}/v1/{policy}/{model}:predict{query}",
            json={"instances": [{"id": rid}]},
            headers=headers,
        ) as r,
    ):
        return r.status, await r.read()


class FakeMember:
    """A replica record `name` at `peer_address` in Redis, as a hostile writer would put it:
    unsigned (`token` None: all a Redis writer can do), or signed with the fleet token and
    re-signed every second as a replica's heartbeat is (a genuine replica's record whose
    address another process now holds, e.g. a dead pod's IP reused within the record's life;
    or a replica that vanished without its record expiring yet)."""

    def __init__(self, fleet2: Fleet2, name: str, peer_address: str, token: bytes | None) -> None:
        self.fleet2, self.name, self.peer_address, self.token = fleet2, name, peer_address, token
        self._stop = threading.Event()
        self._write()
        self._thread: threading.Thread | None = None
        if token is not None:
            self._thread = threading.Thread(target=self._beat, daemon=True)
            self._thread.start()

    def _write(self) -> None:
        record: dict[str, Any] = {"id": self.name, "address": "127.0.0.1:1"}
        record["peer_address"] = self.peer_address
        if self.token is not None:
            record["peer_signature"] = sign_member(
                self.token, self.name, self.peer_address, time.time()
            )
        with self.fleet2.redis() as r:
            r.set(keys.peer_key(self.name), json.dumps(record), ex=120)

    def _beat(self) -> None:
        while not self._stop.wait(1.0):
            self._write()

    def close(self) -> None:
        """Delete the record and wait until every replica has dropped it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with self.fleet2.redis() as r:
            r.delete(keys.peer_key(self.name))
        eventually(
            lambda: all(
                self.fleet2.metric(i, "mlproxy_peer_members") == REPLICAS for i in range(REPLICAS)
            ),
            30,
            f"the replicas dropped the {self.name} record",
        )


def fake_member(
    fleet2: Fleet2, name: str, peer_address: str, policy: str, backend: str, signed: bool
) -> tuple[FakeMember, str]:
    """Register a `FakeMember` (`signed`: with the fleet token), wait until every replica has
    read it (taken it as a member if signed, refused it if not), and return it with a model of
    `policy` (backend URL `backend`/v1/models/{model}:predict) whose batching key it owns, or
    would own were it a member. The caller closes it."""
    token = None
    if signed:
        assert fleet2.stack.peer_token_file is not None
        token = fleet2.stack.peer_token_file.read_bytes().strip()
    refused = [
        fleet2.metric(i, "mlproxy_peer_members_rejected_total", reason="unsigned")
        for i in range(REPLICAS)
    ]
    fake = FakeMember(fleet2, name, peer_address, token)
    members = [*fleet2.members(), peer_address]
    model = next(
        m
        for m in (f"{name}{k}" for k in range(200))
        if owner(batching_key(policy, f"{backend}/v1/models/{m}:predict"), members) == peer_address
    )
    try:
        if signed:
            eventually(
                lambda: all(
                    fleet2.metric(i, "mlproxy_peer_members") == REPLICAS + 1
                    for i in range(REPLICAS)
                ),
                30,
                f"the replicas take the {name} record",
            )
        else:
            eventually(
                lambda: all(
                    fleet2.metric(i, "mlproxy_peer_members_rejected_total", reason="unsigned")
                    > refused[i]
                    for i in range(REPLICAS)
                ),
                30,
                f"the replicas read (and refuse) the {name} record",
            )
    except BaseException:
        fake.close()
        raise
    return fake, model


@pytest.fixture
def rogue(fleet2: Fleet2, echo_backend: EchoBackend) -> Iterator[tuple[RogueOwner, str]]:
    """A rogue owner registered in Redis as a replica by a Redis writer (no fleet token: the
    record is unsigned), and a model whose key it would own were it a member."""
    yield from _rogue_owner(fleet2, echo_backend, "rogue", signed=False)


@pytest.fixture
def rogue_at_a_members_address(
    fleet2: Fleet2, echo_backend: EchoBackend
) -> Iterator[tuple[RogueOwner, str]]:
    """A rogue owner listening at the address of a member whose record is signed with the
    fleet token (a replica that died, its IP reused before its record expired), and a model
    whose key it owns."""
    yield from _rogue_owner(fleet2, echo_backend, "taken", signed=True)


def _rogue_owner(
    fleet2: Fleet2, echo_backend: EchoBackend, name: str, signed: bool
) -> Iterator[tuple[RogueOwner, str]]:
    """A RogueOwner listening at a fake member's address (its record `signed` with the fleet
    token or not), and a model whose key that member owns; closed after."""
    rogue = RogueOwner()
    try:
        fake, model = fake_member(
            fleet2, name, rogue.address, "peered", echo_backend.url, signed=signed
        )
        try:
            yield rogue, model
        finally:
            fake.close()
    finally:
        rogue.close()


def test_a_rogue_owner_at_a_members_address_cannot_answer_the_clients(
    fleet2: Fleet2, rogue_at_a_members_address: tuple[RogueOwner, str]
) -> None:
    """Finding: a replica accepted any answer from the address Redis named as the owner (the
    answer was not authenticated), so a Redis writer with a listener inside --peer-networks
    answered clients with whatever it liked. Fixed: the owner signs its answer with the fleet
    token, bound to the request's signature; an unsigned answer is a malformed one (the owner
    is marked down, the request is batched where it entered). Since member records are signed
    too, a Redis writer's listener is no member at all; this still holds for a process at the
    address of a member whose signed record is still live."""
    server, model = rogue_at_a_members_address
    for i in range(REPLICAS):
        status, body = asyncio.run(post(fleet2.envoys[i], model, f"rg-{i}"))
        assert body != FORGED
        assert (status, json.loads(body)) == (200, {"predictions": [{"echo": f"rg-{i}"}]})
    assert server.received  # it was asked (it is the elected owner): and refused


def test_a_rogue_owner_from_redis_receives_no_client_data(
    fleet2: Fleet2, rogue: tuple[RogueOwner, str]
) -> None:
    """Finding: a Redis writer that registered a fake replica record whose peer_address is a
    listener inside --peer-networks (any pod on a real fleet) received the client bodies of
    every key it won by rendezvous hashing (the forward is signed, but nothing proved the
    receiver held the token before it got the data). Fixed: every replica signs its record's
    peer address with the fleet token at each heartbeat, and only records that verify, fresh,
    are members: the fake record is refused and counted."""
    server, model = rogue
    # keep sending (bounded): it never gets a request
    end = time.monotonic() + 10
    n = 0
    while time.monotonic() < end:
        n += 1
        status, body = asyncio.run(post(fleet2.envoys[n % REPLICAS], model, f"leak-{n}"))
        assert (status, json.loads(body)) == (200, {"predictions": [{"echo": f"leak-{n}"}]})
        leaked = [r.body for r in server.received if b"leak-" in r.body]
        assert not leaked, leaked
        time.sleep(0.25)
    assert all(fleet2.metric(i, "mlproxy_peer_members") == REPLICAS for i in range(REPLICAS))
    assert fleet2.stack.run_dir is not None
    for i in range(REPLICAS):  # and the operator was told, once
        text = (fleet2.stack.run_dir / f"extproc-{i}.log").read_text(errors="replace")
        assert text.count("replica record 'rogue' in Redis") == 1, text[-2000:]
        assert "no fleet token signature" in text


@pytest.mark.parametrize(
    ("query", "headers"),
    [
        ("?pad=" + "a" * 5000, None),  # the path the owner is sent: over its 4096 characters
        ("", {"x-mlproxy-deadline-ms": "1e9"}),  # over the owner's 86,400,000 ms
    ],
    ids=["long-query", "huge-deadline"],
)
def test_one_clients_odd_request_does_not_take_the_owner_out_for_everyone(
    fleet2: Fleet2, echo_backend: EchoBackend, query: str, headers: dict[str, str] | None
) -> None:
    """Finding: a request the owner refuses as malformed (INVALID_ARGUMENT: a path with a
    query string over 4096 characters, or an x-mlproxy-deadline-ms over a day) marked the
    owner down for PEER_DOWN_S, so every client's requests for every key it owns were batched
    where they entered (the fleet's batches split again) for 3 s per such request: one client
    undid the coordination for all. Fixed: the caller sends the client's budget capped at the
    SLA (what it means anyway), and INVALID_ARGUMENT falls back for that request alone."""
    members = fleet2.members()
    model = next(
        m
        for m in (f"odd{k}" for k in range(200))
        if owner(batching_key("peered", f"{echo_backend.url}/v1/models/{m}:predict"), members)
        == members[0]
    )
    entry = fleet2.envoys[1]
    status, body = asyncio.run(post(entry, model, "odd-1", query, headers))
    assert (status, json.loads(body)) == (200, {"predictions": [{"echo": "odd-1"}]})
    forwarded = fleet2.metric(1, "mlproxy_peer_forwarded_total", outcome="ok")
    status, body = asyncio.run(post(entry, model, "odd-2"))
    assert (status, json.loads(body)) == (200, {"predictions": [{"echo": "odd-2"}]})
    # the next request, another client's as far as the owner is concerned, still went to it
    assert fleet2.metric(1, "mlproxy_peer_forwarded_total", outcome="ok") == forwarded + 1


def test_a_peer_address_where_nothing_answers_does_not_fail_requests(
    fleet2: Fleet2, echo_backend: EchoBackend
) -> None:
    """Finding: a replica record (hostile Redis, or a replica that vanished without its
    record expiring yet) whose peer address accepts no gRPC connection made every request
    whose key it won wait, in the channel's connection attempt, until the forward's
    deadline (its remaining time + backend.timeout_ms + 0.25 s), then answered 504; and again
    after each PEER_DOWN_S. Fixed: a request is forwarded only over a connected channel; while
    the owner's channel is not ready, it is batched where it entered (the channel keeps
    connecting)."""
    hole = ConnectionRecorder(hold=True)
    fake: FakeMember | None = None
    try:
        # signed: a replica that vanished, its record not yet expired (an unsigned record,
        # from a Redis writer, is no member at all)
        fake, model = fake_member(
            fleet2, "hole", hole.address, "brisk", echo_backend.url, signed=True
        )

        async def burst() -> list[tuple[int, bytes]]:
            return list(
                await asyncio.gather(
                    *(
                        post(fleet2.envoys[n % REPLICAS], model, f"hole-{n}", policy="brisk")
                        for n in range(6)
                    )
                )
            )

        for n, (status, body) in enumerate(asyncio.run(burst())):
            assert (status, json.loads(body)) == (200, {"predictions": [{"echo": f"hole-{n}"}]})
    finally:
        if fake is not None:
            fake.close()
        hole.close()


def test_a_tight_client_deadline_does_not_time_out_the_forward(
    fleet2: Fleet2, echo_backend: EchoBackend
) -> None:
    """Finding: a client deadline (x-mlproxy-deadline-ms) that leaves the entry replica time
    for the hop, but that the owner finds late on arrival (below what the backend can do), is
    held by the owner as best effort, as a request with the SLA would wait (about the SLA),
    longer than the entry replica waited for the owner (the request's remaining time +
    backend.timeout_ms + 0.25 s): the client got 504 instead of its best-effort answer, and
    the owner was marked down, so every client's requests for its keys were batched where
    they entered for 3 s. Fixed: a forward waits for what the owner may take, up to two SLAs
    (when best effort gives up) + backend.timeout_ms."""
    members = fleet2.members()
    model = next(
        m
        for m in (f"lazy{k}" for k in range(200))
        if owner(batching_key("lazy", f"{echo_backend.url}/v1/models/{m}:predict"), members)
        == members[0]
    )
    entry = fleet2.envoys[1]
    status, body = asyncio.run(post(entry, model, "lazy-0", policy="lazy"))  # an SLA seen
    assert status == 200, body
    timeouts = fleet2.metric(1, "mlproxy_peer_forwarded_total", outcome="timeout")
    # Which budgets are forwarded yet late at the owner depends on this machine's speed:
    # a sweep of them, one at a time.
    for k in range(1, 21):
        ms = f"{k * 0.5:g}"
        status, body = asyncio.run(
            post(entry, model, f"lazy-{k}", headers={"x-mlproxy-deadline-ms": ms}, policy="lazy")
        )
        # an answer (best effort), or shed at once where it entered (no time for the hop)
        assert status in (200, 503), (ms, status, body)
        if status == 200:
            assert json.loads(body) == {"predictions": [{"echo": f"lazy-{k}"}]}
    assert fleet2.metric(1, "mlproxy_peer_forwarded_total", outcome="timeout") == timeouts
