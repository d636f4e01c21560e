"""Fleet coordination through the real stack: Redis, the control plane, 3 ext_proc replicas
with peering on (as `mlproxy up --replicas 3` turns it on), and one Envoy in front of each
replica, so that the test knows which replica each request entered through.

The replica that owns a batching key batches the requests of every replica; every client
still gets exactly its own answer; a dead owner's requests are batched where they entered;
a peer call without the fleet token is refused; a peer address in Redis outside
--peer-networks is never contacted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import grpc
import pytest
import redis
import yaml

from extproc.adapters.peers import (
    AUTH_METADATA,
    FORWARD_PATH,
    REPLY_AUTH_METADATA,
    ForwardRequest,
    batching_key,
    check_reply,
    decode_reply,
    sign,
)
from extproc.core.owner import owner
from mlproxy.client import ApiError, Client
from mlproxy.envoy_config import local_config
from mlproxy.stack import Child, Stack, envoy_binary, http_ok
from mlproxy_kernel import keys
from tests.servers import EchoBackend
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

REPLICAS = 3
# Only 127.0.0.1 is a peer network: the hostile record points at 127.0.0.2.
NETWORKS = "127.0.0.1/32"


@dataclass
class Fleet:
    stack: Stack
    api: Client
    envoys: list[str]  # the Envoy URL in front of each replica

    def peer_address(self, i: int) -> str:
        return f"127.0.0.1:{self.stack.peer_ports[i]}"

    def members(self) -> list[str]:
        return [self.peer_address(i) for i in range(REPLICAS)]

    def owner_of(self, policy: str, backend_url: str) -> int:
        """The index of the replica that owns a key (as every replica computes it)."""
        address = owner(batching_key(policy, backend_url), self.members())
        return self.members().index(str(address))

    def metric(self, i: int, name: str, **labels: str) -> float:
        return replica_metric(self.stack, i, name, **labels)

    def redis(self) -> redis.Redis:
        assert self.stack.security is not None
        password = self.stack.security.redis_password_file.read_text(encoding="utf-8")
        return redis.Redis(port=self.stack.redis_port, username="mlproxy", password=password)


def replica_metric(stack: Stack, i: int, name: str, **labels: str) -> float:
    """The sum of replica i's samples of `name` that have `labels`."""
    url = f"http://127.0.0.1:{stack.metrics_ports[i]}/metrics"
    total = 0.0
    for line in urllib.request.urlopen(url, timeout=5).read().decode().splitlines():
        sample, _, value = line.rpartition(" ")
        metric, _, rest = sample.partition("{")
        found = dict(re.findall(r'(\w+)="([^"]*)"', rest))
        if metric == name and all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


def echo_policy(echo: EchoBackend, model: str = "{model}", wait_ms: int = 150) -> dict[str, Any]:
    return {
        "match": {"path": f"/v1/peered/{model}:predict"},
        "backend": {"url": f"{echo.url}/v1/models/{model}:predict", "timeout_ms": 5000},
        "sla": {"latency_ms": 5000, "percentile": 99},
        "batching": {
            "mode": "static",
            "max_batch_size": 64,
            "max_wait_ms": wait_ms,
            "max_in_flight": 4,
            "max_queue": 10_000,
        },
    }


def rolled_out(api: Client, name: str) -> bool:
    try:
        status = api.status(name)
    except ApiError:
        return False
    return bool(status["complete"] and status["replicas"] == REPLICAS)


def start_envoy(stack: Stack, i: int) -> str:
    """An Envoy in front of replica i alone; its URL."""
    assert stack.run_dir is not None
    port, admin = stack.reserve_port(), stack.reserve_port()
    config = local_config(
        listener_port=port,
        extproc=[("127.0.0.1", stack.extproc_ports[i])],
        model_port=stack.model_port,
        admin_port=admin,
    )
    path = stack.run_dir / f"envoy-{i}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    url = f"http://127.0.0.1:{port}"
    stack.start_child(
        Child(
            f"envoy-{i}",
            [
                envoy_binary(),
                "-c",
                str(path),
                "--log-level",
                "warn",
                "--disable-hot-restart",
                "--concurrency",
                "1",
            ],
            stack.run_dir / f"envoy-{i}.log",
            ready=lambda: http_ok(f"{url}/healthz"),
        ),
        60,
    )
    return url


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, echo_backend: EchoBackend) -> Iterator[Fleet]:
    stack = Stack(
        envoy_port=0,
        replicas=REPLICAS,
        controlplane_port=0,
        seed_demo=False,
        peer_networks=NETWORKS,
        run_dir=tmp_path_factory.mktemp("peering"),
    )
    assert stack.peering and len(stack.peer_ports) == REPLICAS  # on by itself for a fleet
    try:
        stack.start(timeout=60)
        api = Client(stack.controlplane_url, stack.admin_token)
        api.put_policy("peered", echo_policy(echo_backend))
        api.put_policy("held", echo_policy(echo_backend, "held", wait_ms=3000))
        brisk = echo_policy(echo_backend, "brisk", wait_ms=20)
        brisk["sla"] = {"latency_ms": 300, "percentile": 99}
        api.put_policy("brisk", brisk)
        names = ("peered", "held", "brisk")
        eventually(lambda: all(rolled_out(api, n) for n in names), 30, "rollout")
        envoys = [start_envoy(stack, i) for i in range(REPLICAS)]
        fleet = Fleet(stack, api, envoys)
        eventually(
            lambda: all(fleet.metric(i, "mlproxy_peer_members") == REPLICAS for i in range(3)),
            30,
            "every replica sees the 3 members",
        )
        yield fleet
    finally:
        dead = stack.dead_child()
        stack.stop()
        stack.release_ports()
    assert dead is None, f"{dead.name} died; log:\n{dead.log_tail()}"


async def post_all(
    requests: list[tuple[str, str, str]], timeout: float = 30
) -> dict[str, tuple[int, Any]]:
    """POST each (Envoy URL, model, id) at once; id -> (status, JSON answer)."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def one(url: str, model: str, rid: str) -> tuple[str, tuple[int, Any]]:
            async with session.post(
                f"{url}/v1/peered/{model}:predict", json={"instances": [{"id": rid}]}
            ) as r:
                return rid, (r.status, json.loads(await r.read()))

        done = await asyncio.gather(*(one(*r) for r in requests))
    return dict(done)


def entered(rid: str) -> int:
    return int(rid.split("-", 2)[1])


def test_the_owner_batches_requests_of_every_replica_and_each_client_gets_its_own_answer(
    fleet: Fleet, echo_backend: EchoBackend
) -> None:
    url = f"{echo_backend.url}/v1/models/m1:predict"
    owner_i = fleet.owner_of("peered", url)
    served = fleet.metric(owner_i, "mlproxy_peer_served_total")
    requests = [(fleet.envoys[i], "m1", f"a-{i}-{n}") for n in range(20) for i in range(REPLICAS)]
    answers = asyncio.run(post_all(requests))
    for _, _, rid in requests:
        assert answers[rid] == (200, {"predictions": [{"echo": rid}]}), rid
    ours = {rid for _, _, rid in requests}
    # the session's echo backend also holds other modules' instances, lists among them
    batches = [
        [i for i in b if isinstance(i, str) and i in ours] for b in list(echo_backend.batches)
    ]
    batches = [b for b in batches if b]
    assert sorted(i for b in batches for i in b) == sorted(ours)  # each sent exactly once
    # The owner put requests that entered through different replicas into one backend call.
    assert any(len({entered(rid) for rid in b}) >= 2 for b in batches), batches
    assert fleet.metric(owner_i, "mlproxy_peer_served_total") - served >= 2 * 20
    for i in range(REPLICAS):
        if i != owner_i:
            assert fleet.metric(i, "mlproxy_peer_forwarded_total", outcome="ok") >= 20


def test_keys_spread_over_owners_and_every_answer_is_its_own(
    fleet: Fleet, echo_backend: EchoBackend
) -> None:
    """A policy per model ({model} in its backend URL): one owner per model, not per policy."""
    models = [f"spread{k}" for k in range(12)]
    owners = {fleet.owner_of("peered", f"{echo_backend.url}/v1/models/{m}:predict") for m in models}
    assert len(owners) > 1
    requests = [
        (fleet.envoys[i], m, f"s-{i}-{m}-{n}")
        for m in models
        for i in range(REPLICAS)
        for n in range(3)
    ]
    served = [fleet.metric(i, "mlproxy_peer_served_total", policy="peered") for i in range(3)]
    answers = asyncio.run(post_all(requests))
    for _, _, rid in requests:
        assert answers[rid] == (200, {"predictions": [{"echo": rid}]}), rid
    grew = [
        fleet.metric(i, "mlproxy_peer_served_total", policy="peered") > served[i] for i in range(3)
    ]
    assert sum(grew) == len(owners)  # each owner served the models it owns for the others
    # every model is a key its owner counts (one per model, not one per policy)
    eventually(
        lambda: sum(fleet.metric(i, "mlproxy_peer_owned_keys") for i in range(3)) >= len(models),
        15,
        "owners count the models' keys",
    )
    ours = {rid for _, _, rid in requests}
    for batch in echo_backend.batches:
        mine = [rid for rid in batch if isinstance(rid, str) and rid in ours]
        # a batch is one model's (one key's)
        assert len({rid.split("-")[2] for rid in mine}) <= 1, mine


def _forward_payload(fleet: Fleet, echo: EchoBackend, rid: str) -> bytes:
    return ForwardRequest(
        "peered",
        f"{echo.url}/v1/models/m1:predict",
        "/v1/peered/m1:predict",
        "ip:127.0.0.1",
        None,
        0.0,
        0.0,
        json.dumps({"instances": [{"id": rid}]}).encode(),
    ).encode()


def test_a_peer_call_without_the_fleet_token_is_refused_and_serves_nothing(
    fleet: Fleet, echo_backend: EchoBackend
) -> None:
    target = fleet.peer_address(0)
    assert fleet.stack.peer_token_file is not None
    token = fleet.stack.peer_token_file.read_bytes().strip()
    refused = fleet.metric(0, "mlproxy_peer_auth_failures_total")
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(FORWARD_PATH)
        now = time.time()
        for rid, auth in [
            ("nt-none", None),
            ("nt-wrong", lambda p: sign(b"not the fleet token, but as long", p, now)),
            ("nt-other-body", lambda p: sign(token, b"another payload", now)),
            ("nt-stale", lambda p: sign(token, p, now - 3600)),
            ("nt-garbage", lambda p: "x" * 90),
        ]:
            payload = _forward_payload(fleet, echo_backend, rid)
            metadata = () if auth is None else ((AUTH_METADATA, auth(payload)),)
            with pytest.raises(grpc.RpcError) as err:
                call(payload, metadata=metadata, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, rid
        # the same call with the token is served: the refusals were for the token alone
        payload = _forward_payload(fleet, echo_backend, "nt-signed")
        auth = sign(token, payload, time.time())
        raw, rpc = call.with_call(payload, metadata=((AUTH_METADATA, auth),), timeout=10)
    signature = dict(rpc.trailing_metadata() or ()).get(REPLY_AUTH_METADATA)
    reply, _ = decode_reply(check_reply(token, auth, raw, signature))
    assert reply.status == 200
    assert json.loads(reply.body) == {"predictions": [{"echo": "nt-signed"}]}
    sent = echo_backend.sent_ids()
    assert "nt-signed" in sent
    refused_ids = {"nt-none", "nt-wrong", "nt-other-body", "nt-stale", "nt-garbage"}
    assert not [i for i in sent if isinstance(i, str) and i in refused_ids]
    assert fleet.metric(0, "mlproxy_peer_auth_failures_total") - refused == 5


class ConnectionRecorder:
    """A loopback TCP listener that counts every connection made to it and either closes it
    at once or, with `hold`, keeps it open and never says a word (what a peer address in
    Redis looks like when nothing answers there: on a pod network, an unused IP)."""

    def __init__(self, host: str = "127.0.0.1", hold: bool = False) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind((host, 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.address = f"{host}:{self.sock.getsockname()[1]}"
        self.connections = 0
        self.held: list[socket.socket] = []
        self._hold = hold
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            if self._hold:
                self.held.append(conn)
            else:
                conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for conn in self.held:
            with contextlib.suppress(OSError):
                conn.close()
        self.sock.close()


def test_a_peer_address_in_redis_outside_the_peer_networks_is_never_contacted(
    fleet: Fleet, echo_backend: EchoBackend
) -> None:
    recorder = ConnectionRecorder("127.0.0.2")
    try:
        record = {"id": "intruder", "address": "127.0.0.2:1", "peer_address": recorder.address}
        with fleet.redis() as r:
            r.set(keys.peer_key("intruder"), json.dumps(record), ex=120)
        seen: list[set[str]] = [set() for _ in range(REPLICAS)]

        def beaten_twice() -> bool:
            with fleet.redis() as r:
                for i in range(REPLICAS):
                    raw = r.get(keys.replica_key(f"extproc-{i}"))
                    if raw is not None:
                        seen[i].add(json.loads(raw)["heartbeat_at"])
            return all(len(s) >= 3 for s in seen)

        # every replica has read the live records (after its heartbeat) since the intruder's
        eventually(beaten_twice, 60, "two heartbeats of every replica")
        # Had it been a member, it would own about a quarter of these keys.
        models = [f"intr{k}" for k in range(16)]
        requests = [
            (fleet.envoys[k % REPLICAS], m, f"h-{k % REPLICAS}-{m}") for k, m in enumerate(models)
        ]
        answers = asyncio.run(post_all(requests))
        for _, _, rid in requests:
            assert answers[rid] == (200, {"predictions": [{"echo": rid}]}), rid
        assert recorder.connections == 0
        assert all(fleet.metric(i, "mlproxy_peer_members") == REPLICAS for i in range(3))
        assert fleet.stack.run_dir is not None
        for i in range(REPLICAS):  # and the operator was told
            text = (fleet.stack.run_dir / f"extproc-{i}.log").read_text(errors="replace")
            assert re.search(r"intruder.*outside --peer-networks.*never contacted", text)
    finally:
        with fleet.redis() as r:
            r.delete(keys.peer_key("intruder"))
        recorder.close()


def test_a_client_that_goes_away_is_withdrawn_from_the_owners_queue(
    fleet: Fleet, echo_backend: EchoBackend
) -> None:
    url = f"{echo_backend.url}/v1/models/held:predict"
    owner_i = fleet.owner_of("held", url)
    entry = (owner_i + 1) % REPLICAS
    cancelled = fleet.metric(owner_i, "mlproxy_requests_total", policy="held", outcome="cancelled")

    async def leave_early() -> None:
        async with aiohttp.ClientSession() as session:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.5):
                    await session.post(
                        f"{fleet.envoys[entry]}/v1/peered/held:predict",
                        json={"instances": [{"id": "gone-away"}]},
                    )

    asyncio.run(leave_early())
    eventually(
        lambda: (
            fleet.metric(owner_i, "mlproxy_requests_total", policy="held", outcome="cancelled")
            > cancelled
        ),
        20,
        "the owner withdrew the request",
    )
    # a request after it is still batched and answered; the one that went away never is
    answers = asyncio.run(post_all([(fleet.envoys[entry], "held", "stayed")]))
    assert answers["stayed"][0] == 200
    assert "gone-away" not in echo_backend.sent_ids()


def test_a_stalled_owner_is_probed_and_its_keys_batched_where_they_enter(
    fleet: Fleet, echo_backend: EchoBackend
) -> None:
    """An owner that stops (SIGSTOP: its connections stay open, nothing answers) is noticed
    by the first forward that is late past its deadline plus the SLA: its health check does
    not answer, and the requests after that are batched where they enter, at once."""
    url = f"{echo_backend.url}/v1/models/brisk:predict"
    owner_i = fleet.owner_of("brisk", url)
    entry = (owner_i + 1) % REPLICAS
    child = fleet.stack.child(f"extproc-{owner_i}")
    assert child.proc is not None and fleet.stack.run_dir is not None
    log = fleet.stack.run_dir / f"extproc-{entry}.log"
    # warm the channel to the owner while it answers
    assert asyncio.run(post_all([(fleet.envoys[entry], "brisk", "w-0")]))["w-0"][0] == 200
    first: dict[str, tuple[int, Any]] = {}
    os.kill(child.proc.pid, signal.SIGSTOP)
    try:
        hung = threading.Thread(
            target=lambda: first.update(
                asyncio.run(post_all([(fleet.envoys[entry], "brisk", "stuck-0")]))
            ),
            daemon=True,
        )
        hung.start()
        eventually(
            lambda: f"owner replica {fleet.peer_address(owner_i)} is late" in log.read_text(),
            30,
            "the entry replica probed the stalled owner",
        )
        answers = asyncio.run(
            post_all([(fleet.envoys[entry], "brisk", f"after-{n}") for n in range(8)], timeout=4)
        )
        for n in range(8):
            rid = f"after-{n}"
            assert answers[rid] == (200, {"predictions": [{"echo": rid}]}), rid
    finally:
        os.kill(child.proc.pid, signal.SIGCONT)
    hung.join(30)
    # the request the owner held: its own answer (the owner resumed), or 504, never another's
    status, doc = first["stuck-0"]
    assert (status, doc) == (200, {"predictions": [{"echo": "stuck-0"}]}) or status == 504


def test_when_the_owner_dies_its_requests_are_batched_where_they_entered(
    fleet: Fleet, echo_backend: EchoBackend
) -> None:
    """Last in this module: it kills a replica (and starts it again)."""
    url = f"{echo_backend.url}/v1/models/m2:predict"
    owner_i = fleet.owner_of("peered", url)
    others = [i for i in range(REPLICAS) if i != owner_i]
    fallback = sum(
        fleet.metric(i, "mlproxy_peer_forwarded_total", outcome="fallback") for i in others
    )
    results: dict[str, tuple[int, Any]] = {}

    async def traffic(stop: threading.Event) -> None:
        n = 0
        while not stop.is_set() and n < 400:
            batch = [(fleet.envoys[i], "m2", f"k-{i}-{n}-{j}") for i in others for j in range(4)]
            n += 1
            results.update(await post_all(batch))

    stop = threading.Event()
    thread = threading.Thread(target=lambda: asyncio.run(traffic(stop)), daemon=True)
    thread.start()
    child = fleet.stack.child(f"extproc-{owner_i}")
    try:
        eventually(lambda: len(results) >= 40, 60, "traffic before the kill")
        assert child.proc is not None
        child.proc.kill()
        child.proc.wait(10)
        before = len(results)
        eventually(lambda: len(results) >= before + 80, 60, "traffic after the kill")
    finally:
        stop.set()
        thread.join(60)
        if child.exited() is not None:
            fleet.stack.restart(child.name, 60)
    for rid, answer in results.items():
        assert answer == (200, {"predictions": [{"echo": rid}]}), rid
    assert (
        sum(fleet.metric(i, "mlproxy_peer_forwarded_total", outcome="fallback") for i in others)
        > fallback
    )
