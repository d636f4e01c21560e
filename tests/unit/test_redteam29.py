"""Red team 29: the allowance for the way back taken from each reply's body round trip
(extproc/core/hops.py, "Outbound"; extproc/adapters/servicer.py `_receive`/`_answer`).

The round trip is measured from the headers' answer written to the body's message read. Envoy
sends a BUFFERED body only once it has all of it, so the round trip holds the client's own
upload time, bounded only by the body wait (the SLA of the most patient candidate policy, at
least BODY_WAIT_FLOOR_S = 1 s), not by the request's SLA as the inbound excess was. And the
samples were pooled over every policy the process serves, while the allowance is capped per
policy (half of *its* SLA). Both fail on b55ea70. Fake streams and a fake clock, as in
tests/unit/test_way_back.py.
"""

from __future__ import annotations

import json
from typing import Any

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

FAST = "/v1/models/fast:predict"  # the victims' policy: SLA 400 ms
TIGHT = "/v1/models/tight:predict"  # another policy of the same process: SLA 20 ms
UPLOAD = "/v1/models/upload:predict"  # a policy for large, slow uploads: SLA 10 s


def _policy(name: str, sla_ms: float) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"path": f"/v1/models/{name}:predict"},
        "backend": {"url": "http://backend/v1/models/m:predict"},
        "batching": {"max_batch_size": 1, "max_wait_ms": 0},
        "sla": {"latency_ms": sla_ms, "percentile": 99},
    }


def harness() -> tuple[ExtProcServicer, FakeClock, RecordingMetrics]:
    policies = parse_policies(
        {"policies": [_policy("fast", 400), _policy("tight", 20), _policy("upload", 10_000)]}
    )
    clock = FakeClock(1000.0)
    metrics = RecordingMetrics()
    pool = BatcherPool(BatchExecutor(FakeBackend(), metrics, clock), clock, metrics)
    pool.update_policies(policies)
    servicer = ExtProcServicer(Router(policies), pool, metrics, hops=Hops(refresh=0.0))
    return servicer, clock, metrics


def stream(
    servicer: ExtProcServicer, clock: FakeClock, path: str, waited: float, rt: float
) -> RoundTripStream:
    """A request for `path` Envoy received `waited` seconds before its headers reach ext_proc
    (a client sending its headers slowly: the old design's lever), its body back `rt` seconds
    after their answer (a client sending its body slowly: the new one's)."""
    wall = clock.now() + servicer._epoch - waited
    return RoundTripStream(clock, stamped_headers_msg(path, wall), rt, body_msg({"instances": [1]}))


async def serve(
    servicer: ExtProcServicer, clock: FakeClock, path: str, waited: float, rt: float
) -> None:
    s = stream(servicer, clock, path, waited, rt)
    await servicer.process(None, s)
    assert s.status() == 200, json.loads(s.out[-1].immediate_response.body)


async def fast_allowance_beside(every: int, path: str, waited: float, rt: float) -> float:
    """The allowance the `fast` policy's next request gets after 200 replies, one in `every`
    of them for `path`, late by `waited` on the way in and `rt` in its body's round trip, the
    rest `fast` requests with no delay and a 0.5 ms round trip."""
    servicer, clock, metrics = harness()
    await serve(servicer, clock, FAST, 0.0, 0.0005)  # this Envoy's floor
    for i in range(200):
        clock.advance(0.01)
        if i % every == 0:
            await serve(servicer, clock, path, waited, rt)
        else:
            await serve(servicer, clock, FAST, 0.0, 0.0005)
    clock.advance(0.01)
    await serve(servicer, clock, FAST, 0.0, 0.0005)  # a victim: the time reserved for it
    return metrics.allowances["fast"]


async def test_a_client_of_a_tight_policy_cannot_reserve_more_than_its_sla_for_others() -> None:
    """Finding 1 (medium). A hostile client of a policy with a small SLA (20 ms) that sends its
    headers AND its body as slowly as ext_proc lets it (0.9 s, under the 1 s body-wait floor)
    on more than 1 % of the process's replies. Before b55ea70 each reply's sample was its
    inbound excess bounded by its own SLA (20 ms); with b55ea70 the body round trip was bounded
    only by the body wait and the pooled p99 set the 400 ms policy's allowance to its cap,
    200 ms: every victim's deadline 175 ms earlier."""
    # 5 % of the replies: the attacker, on the other policy
    allowance = await fast_allowance_beside(20, TIGHT, 0.9, 0.9)
    assert allowance <= 0.020 * 1.25 + 0.001, allowance  # the tight policy's SLA at most


async def test_benign_slow_uploads_of_one_policy_do_not_shrink_another_policys_deadlines() -> None:
    """Finding 2 (medium, a regression on benign traffic). A policy for large uploads (SLA
    10 s, as docs/security.md advises for slow uploads) whose well-behaved clients take 2 s to
    upload their bodies: their headers arrive at once (inbound excess 0, which the old design
    took), but the round trip holds the upload. With samples pooled over all policies, uploads
    over 1 % of the replies set the unrelated 400 ms policy's allowance to its cap (200 ms)
    although none of its own requests was slow."""
    # 10 % of the replies: uploads, headers at once, body in 2 s
    allowance = await fast_allowance_beside(10, UPLOAD, 0.0, 2.0)
    assert allowance <= 0.002, allowance  # the fast policy's own way back: 0.5 ms


async def test_a_reply_never_batched_leaves_no_round_trip_sample() -> None:
    """Control: a body refused before batching (malformed: 400) is answered without a batch
    and records no round-trip sample, however long its body took."""
    servicer, clock, metrics = harness()
    s = stream(servicer, clock, FAST, 0.0, 0.5)
    s._in[1] = body_msg(b"not json")
    await servicer.process(None, s)
    assert s.status() == 400
    clock.advance(0.01)
    await serve(servicer, clock, FAST, 0.0, 0.0005)
    assert metrics.allowances["fast"] == 0.0  # the 400 left no sample (the first 200 not yet)
