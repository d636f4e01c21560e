"""SLA accounting in the runtime (extproc/runtime/pool.py): `BatcherPool.batch` queues a request,
awaits its reply and counts its latency and SLA miss; the servicer only asks (issue 16)."""

from __future__ import annotations

import asyncio
import json

from extproc.codecs import get_codec
from extproc.core.clock import FakeClock
from extproc.runtime.batcher import Ticket
from extproc.runtime.executor import BatchExecutor
from extproc.runtime.pool import BatcherPool, sla_missed
from extproc.runtime.ports import Batching
from extproc.runtime.replies import Reply
from mlproxy_kernel.outcome import Outcome
from mlproxy_kernel.policy import Policy, Route, Router
from tests.fakes import FakeBackend, RecordingMetrics

codec = get_codec("kserve-v1")
POLICY = Policy.model_validate(
    {
        "name": "m",
        "match": {"path": "/m"},
        "backend": {"url": "http://backend/m"},
        "batching": {"max_batch_size": 1, "max_wait_ms": 0},
        "sla": {"latency_ms": 100},
    }
)


def harness(
    backend: FakeBackend | None = None,
) -> tuple[BatcherPool, FakeClock, RecordingMetrics, Route]:
    clock = FakeClock(1000.0)
    metrics = RecordingMetrics()
    pool = BatcherPool(BatchExecutor(backend or FakeBackend(), metrics, clock), clock, metrics)
    pool.update_policies([POLICY])
    route = Router([POLICY]).resolve("/m")
    assert route is not None
    return pool, clock, metrics, route


def body(i: int) -> bytes:
    return json.dumps({"instances": [{"id": i}]}).encode()


def ticket(start: float, budget: float | None = None) -> Ticket:
    future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
    return Ticket(codec.parse(body(0)), future, start, start + 0.1, 0.1, "", start, budget=budget)


async def test_an_answer_within_the_sla_is_counted_with_its_times() -> None:
    backend = FakeBackend(gate=asyncio.Event())
    pool, clock, metrics, route = harness(backend)
    runtime: Batching = pool  # the servicer's view of it
    # its headers came at 1000.0, Envoy received it 10 ms before; the body came 5 ms later
    clock.advance(0.005)
    task = asyncio.create_task(
        runtime.batch(route, codec.parse(body(1)), None, 1000.0, "c", 999.99, 0.0)
    )
    await asyncio.sleep(0.01)
    assert backend.calls == [[{"id": 1}]]  # sent at once (batches of one)
    clock.advance(0.020)
    backend.gate.set()  # type: ignore[union-attr]
    answer = await asyncio.wait_for(task, 2)
    assert answer.reply.status == 200
    assert answer.wait is not None and abs(answer.wait - 0.005) < 1e-9
    assert answer.total is not None and abs(answer.total - 0.025) < 1e-9
    assert answer.answered_at == clock.now()
    ((policy, latency, missed),) = metrics.answered
    assert policy == "m" and abs(latency - 0.035) < 1e-9 and not missed


async def test_an_answer_later_than_the_sla_is_a_miss() -> None:
    backend = FakeBackend(gate=asyncio.Event())
    pool, clock, metrics, route = harness(backend)
    task = asyncio.create_task(
        pool.batch(route, codec.parse(body(1)), None, 1000.0, "", 1000.0, 0.0)
    )
    await asyncio.sleep(0.01)
    clock.advance(0.150)  # the backend takes longer than the 100 ms SLA
    backend.gate.set()  # type: ignore[union-attr]
    answer = await asyncio.wait_for(task, 2)
    assert answer.reply.status == 200
    ((policy, latency, missed),) = metrics.answered
    assert policy == "m" and abs(latency - 0.150) < 1e-9 and missed


async def test_a_request_that_cannot_be_queued_raises_and_is_not_counted() -> None:
    pool, _, metrics, route = harness()
    await pool.drain()  # shutting down: no more requests
    try:
        await pool.batch(route, codec.parse(body(1)), None, 1000.0, "", 1000.0, 0.0)
    except Exception as err:  # ProxyError, answered by the servicer
        assert getattr(err, "status", None) == 503
    else:
        raise AssertionError("queued while shutting down")
    assert metrics.answered == []


async def test_a_caller_that_goes_away_withdraws_its_request_uncounted() -> None:
    backend = FakeBackend()
    pool, _, metrics, route = harness(backend)
    slow = POLICY.model_copy(
        update={
            "batching": POLICY.batching.model_copy(
                update={"max_batch_size": 8, "max_wait_ms": 60_000}
            )
        }
    )
    pool.update_policies([slow])
    task = asyncio.create_task(
        pool.batch(route, codec.parse(body(1)), None, 1000.0, "", 1000.0, 0.0)
    )
    await asyncio.sleep(0.01)
    assert metrics.depth == {"m": 1}
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert metrics.depth == {"m": 0} and ("m", "cancelled") in metrics.requests
    assert metrics.answered == [] and backend.calls == []


async def test_a_shed_request_misses_unless_it_asked_for_less_than_the_sla() -> None:
    shed = Reply(503, b"{}", outcome=Outcome.SHED)
    ok = Reply(200, b"{}")
    assert sla_missed(ticket(0.0), shed, 0.05)  # the policy's SLA could not be met
    assert sla_missed(ticket(0.0, budget=0.1), shed, 0.05)  # it asked for the SLA itself
    assert not sla_missed(ticket(0.0, budget=0.05), shed, 0.05)  # its own tighter deadline
    assert not sla_missed(ticket(0.0), ok, 0.1)  # on time (at the SLA exactly)
    assert sla_missed(ticket(0.0), ok, 0.1001)  # late, whatever its budget
    assert sla_missed(ticket(0.0, budget=0.05), ok, 0.1001)
