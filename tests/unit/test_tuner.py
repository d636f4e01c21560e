"""The fleet tuner's decision, from replica stats: pure, explicit times."""

from __future__ import annotations

import random
from typing import Any

import pytest

from controlplane.domain.tuner import MIN_INTERVAL, tune
from mlproxy_kernel.policy import Policy, Tuning
from mlproxy_kernel.replica import PolicyStats


def policy(mode: str = "adaptive", tuning: Tuning | None = None, **batching: Any) -> Policy:
    return Policy.model_validate(
        {
            "name": "m",
            "match": {"path": "/m"},
            "backend": {"url": "http://b/m"},
            "sla": {"latency_ms": 300, "percentile": 95},
            "batching": {"mode": mode, "max_batch_size": 64, **batching},
            "tuning": None if tuning is None else tuning.model_dump(),
        }
    )


def stats(
    rate: float, requests: int = 1000, misses: int = 0, n: int = 100, seed: int = 0
) -> PolicyStats:
    """One replica's heartbeat stats; its backend takes 20 ms + 2 ms per instance (+-5%)."""
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        size = rng.randint(1, 30)
        samples.append((size, (20 + 2 * size) * rng.uniform(0.95, 1.05)))
    return PolicyStats(
        window_s=60,
        requests=requests,
        arrival_rate=rate,
        sla_misses=misses,
        batches=n,
        mean_batch_size=15,
        batch_samples=samples,
    )


def test_first_round_seeds_the_fit_and_counts_the_replicas() -> None:
    d = tune(policy(), [stats(50, seed=1), stats(50, seed=2)], now=100.0)
    assert d is not None
    t = d.tuning
    assert t.seed_base_ms == pytest.approx(20, abs=3)  # at p95 of +-5% noise: a bit above
    assert t.seed_per_item_ms == pytest.approx(2.0, abs=0.2)
    assert t.replicas == 2
    assert t.max_batch_size is None  # the rule bounds its batches by their deadlines
    assert d.inputs["arrival_rate_total"] == 100 and d.inputs["arrival_rate_per_replica"] == 50
    assert "fleet fit" in d.reason
    assert set(d.changes) >= {"seed_base_ms", "seed_per_item_ms"}


def test_a_batch_bound_an_older_tuner_set_is_cleared() -> None:
    """The old tuner capped each replica's batch at what its share fills within the SLA;
    under load that starved the throughput regime (tests/unit/test_sim.py runs the tuner)."""
    start = Tuning(margin_ms=30.0, seed_base_ms=20, seed_per_item_ms=2, max_batch_size=11)
    d = tune(policy(tuning=start), [stats(300, misses=5)], now=0.0)
    assert d is not None and d.tuning.max_batch_size is None
    assert d.changes["max_batch_size"] == (11, None)


def test_misses_widen_the_margin_and_a_clean_record_narrows_it() -> None:
    start = Tuning(margin_ms=30.0, seed_base_ms=20, seed_per_item_ms=2, max_batch_size=11)
    worse = tune(policy(tuning=start), [stats(50, misses=20)], now=0.0)  # 2% > 0.5% aim
    assert worse is not None and worse.tuning.margin_ms is not None
    assert worse.tuning.margin_ms > 30.0
    assert "wider margin" in worse.reason
    widened = start.model_copy(update={"margin_ms": 60.0})
    better = tune(policy(tuning=widened), [stats(50, misses=0)], now=0.0)
    assert better is not None and better.tuning.margin_ms == pytest.approx(51.0)
    assert "narrower margin" in better.reason
    # never below the default (10% of the SLA): narrowing it bought no pod in the simulator
    # and made adaptive miss where static does not
    near = start.model_copy(update={"margin_ms": 33.0})
    floor = tune(policy(tuning=near), [stats(50, misses=0)], now=0.0)
    assert floor is not None and floor.tuning.margin_ms == pytest.approx(30.0)
    at_default = tune(policy(tuning=start), [stats(50, misses=0)], now=0.0)
    assert at_default is None or at_default.tuning.margin_ms == pytest.approx(30.0)


def test_small_changes_are_not_pushed_and_changes_are_spaced() -> None:
    first = tune(policy(), [stats(50)], now=0.0)
    assert first is not None
    again = policy(tuning=first.tuning)
    # the same fleet a moment later, too few requests to judge the margin: nothing to push
    calm = tune(again, [stats(50, requests=50)], now=100.0)
    assert calm is None
    assert tune(again, [stats(50, misses=200)], now=MIN_INTERVAL - 1, last_change=0.0) is None


def test_the_hold_between_changes_is_a_parameter_defaulting_to_a_minute() -> None:
    """The control plane's MLPROXY_TUNER_HOLD_S: a benchmark that plays traces 5x faster
    holds a policy 12 s, so that in trace time the tuner acts as in production."""
    start = policy(tuning=Tuning(margin_ms=30.0, seed_base_ms=20, seed_per_item_ms=2))
    late = [stats(50, misses=200)]  # 20% missed: the margin must widen as soon as allowed
    assert MIN_INTERVAL == 60.0
    assert tune(start, late, now=59.0, last_change=0.0) is None  # the default: a minute
    assert tune(start, late, now=60.0, last_change=0.0) is not None
    assert tune(start, late, now=11.9, last_change=0.0, hold=12.0) is None
    shorter = tune(start, late, now=12.0, last_change=0.0, hold=12.0)
    assert shorter is not None and "wider margin" in shorter.reason
    assert tune(start, late, now=100.0, last_change=0.0, hold=120.0) is None  # longer too
    assert tune(start, late, now=5.0, hold=120.0) is not None  # never changed: no hold


def test_only_adaptive_policies_that_allow_it_are_tuned() -> None:
    assert tune(policy(mode="static"), [stats(50)], now=0.0) is None
    assert tune(policy(tune=False), [stats(50)], now=0.0) is None
    assert tune(policy(), [], now=0.0) is None  # no replica reports traffic
    few = tune(policy(), [stats(50, n=5, requests=10)], now=0.0)
    # too few samples to fit, too few requests to judge: only the default margin is set
    assert few is not None and few.tuning.seed_base_ms is None
    assert set(few.changes) == {"margin_ms"}


def test_an_operator_margin_is_left_alone() -> None:
    start = Tuning(seed_base_ms=20, seed_per_item_ms=2, max_batch_size=11)
    d = tune(policy(tuning=start, margin_ms=40), [stats(50, misses=200)], now=0.0)
    # the replicas use the operator's 40 ms: the tuner neither widens it nor records its own
    assert d is None or "margin_ms" not in d.changes
