"""Red team 27: the adaptive rule's carried scan (7ccf7a7) kept an idle queue alive, and with
it the requests it sent."""

from __future__ import annotations

import asyncio
import gc
import json
import weakref

from extproc.runtime.batcher import Ticket
from mlproxy_kernel.batching import BatchQueue, Dispatch
from mlproxy_kernel.estimator import LatencyModel
from mlproxy_kernel.rules import AdaptiveRule, FixedLatency
from tests.unit.test_runtime import Harness, adaptive_policy, codec


class Body:
    """A request's parsed body (a Ticket, in extproc): what must not outlive its queue."""


def test_a_rule_kept_after_its_queue_went_idle_keeps_none_of_its_requests_alive() -> None:
    """extproc's RuleStore keeps each batching key's rule after its batcher goes idle and away
    (up to 1,024 keys, which clients make with distinct top-level fields). The scan the rule
    carries on must not keep that queue, and the requests it sent, alive: 64 requests with
    their bodies and replies per key."""
    rule = AdaptiveRule(FixedLatency(LatencyModel(0.01, 0.001)), 8, 1, 10_000)
    refs: list[weakref.ref[Body]] = []

    def batcher_life() -> None:
        q: BatchQueue[Body] = BatchQueue(rule)
        now = 0.0
        for _ in range(64):
            body = Body()
            refs.append(weakref.ref(body))
            q.offer(body, 1, now, now + 0.3)
            while isinstance(action := q.poll(now), Dispatch):
                q.done(action, 0.01, True, now)
            now += 0.001
        assert q.queued == 0 and q.in_flight == 0  # idle: its batcher goes away

    batcher_life()
    gc.collect()
    assert sum(r() is not None for r in refs) == 0


async def test_the_pool_keeps_no_request_of_a_key_whose_batcher_went_away() -> None:
    """Through the pool: each distinct top-level field is a batching key (client-chosen);
    its rule is kept after its batcher goes idle and away, and must not keep its requests
    (their bodies, their replies) alive."""
    h = Harness(adaptive_policy())
    route = h.router.resolve("/v1/models/m:predict")
    assert route is not None
    for k in range(20):
        futs = []
        for i in range(8):  # a full batch: sent at once
            fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
            body = json.dumps({"instances": [{"id": i}], "nonce": k}).encode()
            h.pool.submit(route, codec.parse(body), fut)  # type: ignore[arg-type]
            futs.append(fut)
        await asyncio.wait_for(asyncio.gather(*futs), 5)
    del futs, fut
    for _ in range(5):
        await asyncio.sleep(0)
    assert len(h.pool) == 0  # every batcher idle and gone; 20 rules kept
    h.backend.calls.clear()  # the fake backend's own record of what it was sent
    gc.collect()
    assert sum(isinstance(o, Ticket) for o in gc.get_objects()) == 0
