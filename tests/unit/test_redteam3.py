"""Red team 3, pure parts: the fleet tuner against hostile heartbeat stats; the peer reply
signature against answers moved between calls."""

from __future__ import annotations

import random

import pytest

from controlplane.domain.tuner import tune
from extproc.adapters.peers import (
    PeerProtocolError,
    check_reply,
    decode_reply,
    encode_reply,
    sign,
    sign_reply,
)
from extproc.runtime.replies import Reply
from mlproxy_kernel.policy import Policy
from mlproxy_kernel.replica import PolicyStats

TOKEN = b"a fleet token of at least 16 bytes"


def adaptive() -> Policy:
    return Policy.model_validate(
        {
            "name": "m",
            "match": {"path": "/m"},
            "backend": {"url": "http://b/m", "timeout_ms": 5000},
            "sla": {"latency_ms": 300, "percentile": 95},
            "batching": {"mode": "adaptive", "max_batch_size": 64},
        }
    )


def honest(seed: int) -> PolicyStats:
    rng = random.Random(seed)
    samples = [(b, (20 + 2 * b) * rng.uniform(0.95, 1.05)) for b in range(1, 31) for _ in (0, 1)]
    return PolicyStats(
        window_s=60,
        requests=1000,
        arrival_rate=50,
        sla_misses=0,
        batches=len(samples),
        mean_batch_size=15,
        batch_samples=samples,
    )


@pytest.mark.parametrize(
    "bad",
    [
        [(1, 1e12)] * 100,  # beyond Tuning's seed bound: the fit used to fail validation
        [(4, 5000.5)] * 100,  # longer than the policy's backend timeout: no call took that
    ],
)
def test_a_hostile_heartbeat_cannot_stop_or_skew_the_fleet_tuner(
    bad: list[tuple[int, float]],
) -> None:
    """Finding: one replica record in Redis (ext_proc's Redis user may write any) with batch
    samples of 1e12 ms made every round's fit exceed Tuning's bounds: `tune` raised, the loop
    logged a traceback and skipped the policy, every round, for as long as the record was
    refreshed. Fixed: samples no call of the policy can have made are left out."""
    hostile = honest(9).model_copy(update={"batch_samples": bad})
    decision = tune(adaptive(), [honest(1), honest(2), hostile], now=100.0)
    assert decision is not None
    assert decision.tuning.seed_base_ms == pytest.approx(20, abs=3)
    assert decision.tuning.seed_per_item_ms == pytest.approx(2.0, abs=0.2)


def test_a_peer_reply_is_accepted_only_for_the_call_it_answers() -> None:
    """An owner's answer is signed for the request's own signature: it cannot be replayed as
    the answer to another forward, nor made without the token."""
    reply = Reply(200, b'{"predictions":[1]}')
    auth_a = sign(TOKEN, b"request a", 1000.0)
    auth_b = sign(TOKEN, b"request b", 1000.0)
    frame = encode_reply(reply, None)
    signature = sign_reply(TOKEN, auth_a, frame)
    assert decode_reply(check_reply(TOKEN, auth_a, frame, signature))[0] == reply
    for token, auth, sig in [
        (TOKEN, auth_b, signature),  # another call's answer
        (b"another token, also 16+ bytes", auth_a, signature),
        (TOKEN, auth_a, None),  # unsigned
        (TOKEN, auth_a, "x" * 64),
        (TOKEN, auth_a, "\u00e9" * 64),
    ]:
        with pytest.raises(PeerProtocolError):
            check_reply(token, auth, frame, sig)
