"""Red team 2 (issue 12): attacks on the first red team's fixes, as regressions through the
real stack. Each is marked xfail(strict=True) until it is fixed; each fails on the code it
was found on."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from aiohttp import web

from mlproxy.stack import Stack
from mlproxy_kernel import keys
from tests.e2e.conftest import echo_policy
from tests.e2e.test_envoy import ext_proc_metric
from tests.e2e.test_redteam import (
    MAX_STREAMS,
    active_streams,
    assert_answered_while_matching,
    envoy_and_one_replica,
    post_as,
    process_env,
)
from tests.servers import EchoBackend, ThreadedApp
from tests.waiting import eventually_async

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


def heartbeat(r: redis.Redis, replica: str) -> dict[str, Any]:
    raw = r.get(keys.replica_key(replica))
    assert raw is not None
    beat: dict[str, Any] = json.loads(raw)
    return beat


async def test_a_replicas_credentials_cannot_silently_drop_every_policy_of_every_replica(
    doomed_stack: Stack,
) -> None:
    """docs/security.md says ext_proc's user can only overwrite or delete a key, "which the store
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
        await eventually_async(
            lambda: all(heartbeat(r, f"extproc-{i}")["last_sync_at"] > after for i in range(2)),
            20,
            "each replica synced after the deletion",
            interval=0.2,
        )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        for _ in range(4):  # both replicas (Envoy balances round robin)
            async with s.post(f"{stack.envoy_url}/v1/models/demo:predict", json=DEMO_BODY) as resp:
                assert resp.status == 200
                assert "x-mlproxy-batch-size" in resp.headers, "served unbatched, unchecked"


async def test_a_replicas_credentials_cannot_stop_the_fleet_tuner_for_good(
    doomed_stack: Stack,
) -> None:
    """The tuner's lease is a string with a TTL (15 s) that control planes take with SET NX.
    With ext_proc's credentials a replica writes it without a TTL: the control plane's lease
    is lost (it logs that another control plane leads now) and is never free again, so
    adaptive policies are no longer tuned. After two lease periods a control plane must hold
    the lease again (or the write be refused). Fixed: a lease without a TTL (or with one no
    control plane gives) is taken over at the next round."""
    stack = doomed_stack
    with extproc_redis(stack) as r:
        try:
            r.set(keys.TUNER_LEASE, "red-team|999999")
        except redis.exceptions.NoPermissionError:
            return
        await eventually_async(  # at most 30 s: two lease periods
            lambda: (r.get(keys.TUNER_LEASE) or "|").split("|", 1)[0] != "red-team",
            30,
            "a control plane holding the tuner's lease again (else the tuner is stopped for good)",
            interval=0.2,
        )


async def test_a_path_under_the_length_cap_does_not_stall_ext_proc_on_a_template_with_many_segments(
    echo_backend: EchoBackend, tmp_path: Path
) -> None:
    """The first fix bounds one segment (two variables of at most 128 characters) and the
    path (1024 characters), but not how a failed match backtracks through earlier segments:
    each `{a}-{b}` segment of `a-a-a-...` (127 characters) matches in about 60 ways, and the
    regex tries every combination before the last segment fails. Policy `deep` matches
    /{a}-{b}/{c}-{d}/{e}-{f}/{g}-{h}:predict (allowed: two variables per segment); three
    clients send a 521-character path that ends in `!`; the next client's request to another
    policy must still be answered (the wait bound only stops a hung test)."""
    deep = echo_policy("deep", echo_backend.url)
    deep["match"] = {"path": "/{a}-{b}/{c}-{d}/{e}-{f}/{g}-{h}:predict"}
    deep["backend"]["url"] = f"{echo_backend.url}/v1/models/deep:predict"
    with envoy_and_one_replica(
        echo_backend, tmp_path, [echo_policy("echo", echo_backend.url), deep]
    ) as stack:
        segment = ("a-" * 64)[:127]
        hostile = "/" + "/".join([segment] * 4) + ":predict!"
        assert len(hostile) <= 1024
        await assert_answered_while_matching(stack, hostile, senders=3)


class CrashingBackend(ThreadedApp):
    """The echo model, except that a batch holding the instance `"crash"` drops the
    connection without an answer, as a model server whose worker dies on one input (out of
    memory on a huge tensor, a segfault in a native op) does, and one holding `"hang"` takes
    5 s (an input that is very expensive to compute)."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        app = web.Application()
        app.router.add_post("/v1/models/{model}:predict", self._predict)
        super().__init__(app)

    async def _predict(self, request: web.Request) -> web.StreamResponse:
        instances = (await request.json())["instances"]
        self.calls.append(len(instances))
        if "crash" in instances:
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)  # never sent: the connection is gone
        await asyncio.sleep(5 if "hang" in instances else 0.05)  # the model's compute time
        return web.json_response({"predictions": [{"echo": i} for i in instances]})


@pytest.fixture(scope="module")
def crashing_backend() -> Iterator[CrashingBackend]:
    server = CrashingBackend()
    server.start()
    yield server
    server.stop()


async def test_an_input_that_crashes_the_backend_fails_only_its_own_client(
    echo_backend: EchoBackend, crashing_backend: CrashingBackend, tmp_path: Path
) -> None:
    """The isolation fix bisects a batch whose answer is a 500 or cannot be split, but a
    backend that drops the connection (a worker killed by one input) is an error for every
    request of the batch. One client sends `"crash"`, three others normal inputs, batched
    together (max_wait_ms 300): the three must get their own answers."""
    crashy = echo_policy(
        "crashy", crashing_backend.url, batching={"max_batch_size": 4, "max_wait_ms": 300}
    )
    with envoy_and_one_replica(echo_backend, tmp_path, [crashy]) as stack:
        url = f"{stack.envoy_url}/v1/models/crashy:predict"
        bodies = [{"instances": ["crash"]}] + [{"instances": [f"good-{i}"]} for i in range(3)]
        results = await asyncio.gather(
            *(post_as(f"127.0.0.{2 + i}", url, b) for i, b in enumerate(bodies))
        )
    assert max(crashing_backend.calls) > 1, "never batched: nothing to check"
    for i, (code, _, answer) in enumerate(results[1:]):
        assert code == 200, answer
        assert json.loads(answer) == {"predictions": [{"echo": f"good-{i}"}]}


class OrderBackend(ThreadedApp):
    """The echo model, recording the inputs of each call in the order they came; the calls
    carrying `slow-*` inputs take 1.5 s (so that a test can queue requests behind them), the
    others 50 ms."""

    def __init__(self) -> None:
        self.calls: list[list[Any]] = []
        app = web.Application()
        app.router.add_post("/v1/models/{model}:predict", self._predict)
        super().__init__(app)

    async def _predict(self, request: web.Request) -> web.Response:
        instances = (await request.json())["instances"]
        self.calls.append(instances)
        slow = any(str(i).startswith("slow-") for i in instances)
        await asyncio.sleep(1.5 if slow else 0.05)  # the model's compute time
        return web.json_response({"predictions": [{"echo": i} for i in instances]})

    async def wait_calls(self, n: int) -> None:
        """Until the backend has had `n` calls (at most 3 s)."""
        await eventually_async(
            lambda: len(self.calls) >= n, 3, lambda: f"the backend's call {n} (calls: {self.calls})"
        )


async def test_a_client_cannot_take_the_shared_backend_slots_with_many_sibling_queues(
    echo_backend: EchoBackend, tmp_path: Path
) -> None:
    """Policy `rr` allows one batch at its backend at once. The fix for the multiplied
    concurrency gives a policy's queues (one per compat key) one in-flight count and offers a
    freed slot to the queue that sent least recently. A client (127.0.0.2) that sends 20
    requests, each with another top-level `nonce`, has 20 queues: a normal client
    (127.0.0.3) then waits for all 20 of them between any two of its batches. Per-client
    fairness wants the normal client's second request among the next calls after one of the
    flooder's, not after all 20 (the order of the backend's calls is checked, not times).
    Fixed: a freed slot goes to the queue whose next request's client was served least
    recently."""
    backend = OrderBackend()
    backend.start()
    try:
        rr = echo_policy(
            "rr",
            backend.url,
            batching={"max_batch_size": 8, "max_wait_ms": 5, "max_in_flight": 1},
            backend={"timeout_ms": 10_000},
            sla={"latency_ms": 30_000},
        )
        with envoy_and_one_replica(echo_backend, tmp_path, [rr]) as stack:
            url = f"{stack.envoy_url}/v1/models/rr:predict"

            tasks = [
                asyncio.create_task(
                    post_as("127.0.0.2", url, {"instances": ["slow-x"], "nonce": "first"})
                )
            ]
            await backend.wait_calls(1)  # the flooder holds the backend's one slot
            tasks.append(asyncio.create_task(post_as("127.0.0.3", url, {"instances": ["slow-0"]})))
            await eventually_async(  # queued before the flood
                lambda: ext_proc_metric(stack, 'mlproxy_queue_depth{policy="rr"}') == 1,
                10,
                "the normal client's request queued",
            )
            tasks += [
                asyncio.create_task(post_as("127.0.0.2", url, {"instances": [f"x{i}"], "nonce": i}))
                for i in range(20)
            ]
            await backend.wait_calls(2)  # the normal client's first batch holds the slot now
            tasks.append(asyncio.create_task(post_as("127.0.0.3", url, {"instances": ["n-1"]})))
            results = await asyncio.gather(*tasks)
    finally:
        backend.stop()
    assert all(code == 200 for code, _, _ in results), results
    order = [call[0] for call in backend.calls]
    assert order[:2] == ["slow-x", "slow-0"], order
    assert order.index("n-1") <= 3, order


class RowsBackend(ThreadedApp):
    """A model that reads an instance `{"rows": [...]}` as rows of its own (one prediction
    per row, none for no rows), as a server that flattens a nested input into its batch
    dimension does; any other instance gets one prediction `{"echo": instance}`."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        app = web.Application()
        app.router.add_post("/v1/models/{model}:predict", self._predict)
        super().__init__(app)

    async def _predict(self, request: web.Request) -> web.Response:
        instances = (await request.json())["instances"]
        self.calls.append(len(instances))
        predictions = []
        for i in instances:
            rows = i["rows"] if isinstance(i, dict) and "rows" in i else [i]
            predictions += [{"echo": r} for r in rows]
        return web.json_response({"predictions": predictions})


@pytest.mark.xfail(
    strict=True,
    reason="red team 2: two requests whose miscounts cancel out (one input answered with two "
    "predictions, one with none) pass the count check; the request between them gets the "
    "attacker's prediction and the attacker gets the victim's",
)
async def test_two_miscounts_that_cancel_out_do_not_hand_one_clients_prediction_to_another(
    echo_backend: EchoBackend, tmp_path: Path
) -> None:
    """The miscount fix bisects a batch whose answer has the wrong number of predictions. An
    attacker sends `{"rows": ["a", "b"]}` (two predictions for one instance), a victim's
    request lands after it in the same batch, then the attacker sends `{"rows": []}` (no
    prediction): the total is right, so the answer is split by position and shifted by one.
    The victim must get its own prediction, and the attacker never the victim's."""
    backend = RowsBackend()
    backend.start()
    try:
        rows = echo_policy("rows", backend.url, batching={"max_batch_size": 3, "max_wait_ms": 1000})
        with envoy_and_one_replica(echo_backend, tmp_path, [rows]) as stack:
            url = f"{stack.envoy_url}/v1/models/rows:predict"
            depth = 'mlproxy_queue_depth{policy="rows"}'
            sent: list[asyncio.Task[tuple[int, dict[str, str], bytes]]] = []
            for source, body in [
                ("127.0.0.2", {"instances": [{"rows": ["a", "b"]}]}),
                ("127.0.0.3", {"instances": ["victim-secret"]}),
                ("127.0.0.2", {"instances": [{"rows": []}]}),
            ]:
                sent.append(asyncio.create_task(post_as(source, url, body)))
                if len(sent) < 3:  # arrival order: attacker, victim, attacker
                    await eventually_async(
                        lambda: ext_proc_metric(stack, depth) == len(sent), 10, f"{body} queued"
                    )
            (_, _, first), (code, _, victim), (_, _, last) = await asyncio.gather(*sent)
    finally:
        backend.stop()
    assert backend.calls[0] == 3, f"not one batch of three: {backend.calls}"
    assert b"victim-secret" not in first + last, (first, last)
    assert code == 200, victim
    assert json.loads(victim) == {"predictions": [{"echo": "victim-secret"}]}


@pytest.mark.xfail(
    strict=True,
    reason="red team 2: an input that makes the backend exceed backend.timeout_ms fails "
    "every request of its batch (504)",
)
async def test_an_input_that_makes_the_backend_time_out_fails_only_its_own_client(
    echo_backend: EchoBackend, crashing_backend: CrashingBackend, tmp_path: Path
) -> None:
    """As with a crash: one client's `"hang"` (5 s at the backend, over the policy's 1 s
    timeout) is batched with three normal inputs; the three must get their own answers."""
    hangy = echo_policy(
        "hangy",
        crashing_backend.url,
        batching={"max_batch_size": 4, "max_wait_ms": 300},
        backend={"timeout_ms": 1000},
        sla={"latency_ms": 30_000},
    )
    crashing_backend.calls.clear()
    with envoy_and_one_replica(echo_backend, tmp_path, [hangy]) as stack:
        url = f"{stack.envoy_url}/v1/models/hangy:predict"
        bodies = [{"instances": ["hang"]}] + [{"instances": [f"good-{i}"]} for i in range(3)]
        results = await asyncio.gather(
            *(post_as(f"127.0.0.{2 + i}", url, b) for i, b in enumerate(bodies))
        )
    assert max(crashing_backend.calls) > 1, "never batched: nothing to check"
    for i, (code, _, answer) in enumerate(results[1:]):
        assert code == 200, answer
        assert json.loads(answer) == {"predictions": [{"echo": f"good-{i}"}]}


async def test_clients_with_one_slow_request_each_do_not_lock_out_a_new_client(
    echo_backend: EchoBackend, tmp_path: Path
) -> None:
    """ext_proc runs with --max-streams 32 (its hard stop is 32 + 64). 33 clients (127.0.0.10
    to 127.0.0.42) each hold one unfinished body (a 30 s SLA gives it 30 s), as slow uplinks
    or one host with many addresses (an IPv6 /64) do. A new client holding no stream is below
    any even share, and the replica is far from its hard stop: its request must be served."""
    slow = echo_policy("slow", echo_backend.url, sla={"latency_ms": 30_000})
    with envoy_and_one_replica(echo_backend, tmp_path, [slow]) as stack:
        body = json.dumps({"instances": [{"id": "held"}]}).encode()
        head = (
            "POST /v1/models/slow:predict HTTP/1.1\r\nHost: mlproxy\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        writers = []
        try:
            sources = [f"127.0.0.{10 + i}" for i in range(MAX_STREAMS + 1)]
            for source in sources:
                _, writer = await asyncio.open_connection(
                    "127.0.0.1", stack.envoy_port, local_addr=(source, 0)
                )
                writer.write(head + body[:1])
                await writer.drain()
                writers.append(writer)
            await eventually_async(
                lambda: active_streams(stack) >= len(sources),
                10,
                lambda: (
                    f"ext_proc holds every stream ({active_streams(stack):.0f} of "
                    f"{len(sources)} open; refused: {_refused(stack)})"
                ),
            )
            assert active_streams(stack) == len(sources)
            code, _, answer = await post_as(
                "127.0.0.99",
                f"{stack.envoy_url}/v1/models/slow:predict",
                {"instances": [{"id": "normal"}]},
            )
        finally:
            for writer in writers:
                writer.close()
    assert code == 200, answer
    assert json.loads(answer) == {"predictions": [{"echo": "normal"}]}


def _refused(stack: Stack) -> str:
    """ext_proc's streams refused for its limits, for a failure's message."""
    counts = []
    for reason in ("stream_limit", "client_share"):
        line = 'mlproxy_refused_streams_total{reason="' + reason + '"}'
        counts.append(f"{reason} {ext_proc_metric(stack, line):.0f}")
    return ", ".join(counts)
