"""The allowance for the way back (extproc/core/hops.py, "Outbound"), as the servicer feeds it:
each reply's hand-off plus the round trip its body took through Envoy on the open stream, not
the time its stream waited before reaching ext_proc. Fake streams and a fake clock: the body's
round trip is the clock advanced while the servicer awaits it."""

from __future__ import annotations

import json

from extproc.adapters.servicer import ExtProcServicer
from extproc.core.clock import FakeClock
from extproc.core.hops import Hops
from extproc.runtime.executor import BatchExecutor
from extproc.runtime.pool import BatcherPool
from mlproxy_kernel.policy import Router, parse_policies
from tests.fakes import (
    FakeBackend,
    RecordingMetrics,
    RoundTripStream,
    body_msg,
    stamped_headers_msg,
)

PATH = "/v1/models/m:predict"
SLA = 0.100


def harness() -> tuple[ExtProcServicer, FakeClock, Hops]:
    policies = parse_policies(
        {
            "policies": [
                {
                    "name": "m",
                    "match": {"path": "/v1/models/{model}:predict"},
                    "backend": {"url": "http://backend/v1/models/{model}:predict"},
                    "batching": {"max_batch_size": 1, "max_wait_ms": 0},
                    "sla": {"latency_ms": SLA * 1000, "percentile": 99},
                }
            ]
        }
    )
    clock = FakeClock(1000.0)
    metrics = RecordingMetrics()
    pool = BatcherPool(BatchExecutor(FakeBackend(), metrics, clock), clock, metrics)
    pool.update_policies(policies)
    hops = Hops(refresh=0.0)
    return ExtProcServicer(Router(policies), pool, metrics, hops=hops), clock, hops


async def serve(servicer: ExtProcServicer, clock: FakeClock, waited: float, rt: float) -> None:
    """A request Envoy received `waited` seconds before its headers reach ext_proc, its body
    back `rt` seconds after their answer."""
    wall = clock.now() + servicer._epoch - waited  # the clock Envoy's is read against
    s = RoundTripStream(clock, stamped_headers_msg(PATH, wall), rt, body_msg({"instances": [1]}))
    await servicer.process(None, s)
    assert s.status() == 200, json.loads(s.out[-1].immediate_response.body)


async def test_a_new_streams_wait_to_reach_ext_proc_is_not_reserved_for_the_way_back() -> None:
    """With ext_proc's CPU saturated, new streams wait tens of milliseconds inside it before
    their handler runs; a reply on the open stream does not. Every deadline used to be set that
    much (up to half the SLA) early."""
    servicer, clock, hops = harness()
    await serve(servicer, clock, 0.0, 0.001)  # the least delay from this Envoy: its floor
    for _ in range(50):
        clock.advance(0.01)
        await serve(servicer, clock, 0.060, 0.001)  # 60 ms late to arrive, body back in 1 ms
    allowance = hops.allowance("m", 0.99, SLA, clock.now())
    assert 0.001 <= allowance <= 0.002  # the round trip (and an instant hand-off), not 60 ms


async def test_a_body_slow_to_come_back_through_envoy_is_reserved_for_the_way_back() -> None:
    servicer, clock, hops = harness()
    for _ in range(50):
        clock.advance(0.01)
        await serve(servicer, clock, 0.0, 0.030)  # Envoy took 30 ms to turn the stream around
    allowance = hops.allowance("m", 0.99, SLA, clock.now())
    assert 0.030 <= allowance <= 0.030 * 1.25  # RecentQuantiles' bins are within 25 %
    for _ in range(50):
        clock.advance(0.01)
        await serve(servicer, clock, 0.0, 0.200)  # slower than the SLA: the cap, half of it
    assert hops.allowance("m", 0.99, SLA, clock.now()) == SLA / 2
