"""Red team 5, pure parts: rules that miss the peered replica's fleet bound."""

from __future__ import annotations

import asyncio
import json

from extproc.codecs import get_codec
from extproc.core.clock import MonotonicClock
from extproc.runtime.executor import BatchExecutor
from extproc.runtime.pool import BatcherPool
from mlproxy_kernel.policy import Router, Tuning
from mlproxy_kernel.rules import AdaptiveRule
from tests.fakes import FakeBackend, RecordingMetrics
from tests.unit.test_redteam4 import _adaptive_policy
from tests.waiting import eventually_async

codec = get_codec("kserve-v1")


async def test_a_rule_started_afresh_after_a_failure_keeps_the_fleet_bound() -> None:
    """Finding: `BatcherPool.rule` bounds each adaptive rule it builds by the signed members
    (`bound_fleet`), and `set_fleet_bound` bounds the rules it can see. But `Batcher._pump`,
    when a dispatch rule raises, replaces the rule with `rule_for(self.policy)` directly: the
    new rule has the tuner's `tuning.replicas` as its fleet, unbounded (51 with the 50 forged
    records of red team 4), until the peering's member list next changes, which in a steady
    fleet is never. Any rule failure (a bug, or an input that triggers one) thus undoes the
    red team 4 fix for that queue. Here the bound is 1 (a peered replica alone) and the
    tuner said 51; the rule's `plan` fails once. Fixed: the fresh rule takes the failed
    one's bound."""
    clock = MonotonicClock()
    metrics = RecordingMetrics()
    backend = FakeBackend(gate=asyncio.Event())
    pool = BatcherPool(BatchExecutor(backend, metrics, clock), clock, metrics)
    pool.set_fleet_bound(1)
    policy = _adaptive_policy().model_copy(update={"tuning": Tuning(replicas=51)})
    route = Router([policy]).resolve("/m")
    assert route is not None
    loop = asyncio.get_running_loop()

    def submit(i: int) -> asyncio.Future[object]:
        fut: asyncio.Future[object] = loop.create_future()
        body = json.dumps({"instances": [i]}).encode()
        pool.submit(route, codec.parse(body), fut, client="c")  # type: ignore[arg-type]
        return fut

    real = AdaptiveRule.plan
    failing = False

    def plan(self: AdaptiveRule, queue: object, now: float) -> object:
        if failing:
            raise RuntimeError("a dispatch rule bug")
        return real(self, queue, now)  # type: ignore[arg-type]

    AdaptiveRule.plan = plan  # type: ignore[method-assign]
    try:
        first = submit(0)  # sent within its deadline: in flight, held by the gate
        await eventually_async(lambda: backend.calls, 5, "the first call at the backend")
        assert len(backend.calls) == 1
        (batcher,) = pool._batchers.values()
        assert isinstance(batcher.rule, AdaptiveRule) and batcher.rule.fleet == 1
        failing = True
        second = submit(1)  # the rule fails at its poll (the end of this turn of the loop):
        await asyncio.sleep(0)  # this request is answered 500, the rule replaced
        failing = False
        assert second.done()
        rule = batcher.rule
        backend.gate.set()
        await asyncio.wait_for(first, 5)
    finally:
        AdaptiveRule.plan = real  # type: ignore[method-assign]
    assert isinstance(rule, AdaptiveRule)
    assert rule.fleet == 1, f"the rule started afresh plans for a fleet of {rule.fleet}"
