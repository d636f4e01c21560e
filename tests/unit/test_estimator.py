"""The latency estimator under a fake clock (issue 4's first piece)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.core.clock import FakeClock
from mlproxy_kernel.estimator import DEFAULT_SEED, LatencyEstimator, LatencyModel


def feed(
    est: LatencyEstimator,
    clock: FakeClock,
    a: float,
    c: float,
    n: int,
    seed: int = 0,
    noise: float = 0.1,
) -> None:
    rng = np.random.default_rng(seed)
    for _ in range(n):
        b = int(rng.integers(1, 33))
        t = (a + c * b) * (1 + noise * rng.standard_normal())
        est.observe(b, max(t, 0.0), clock.now())
        clock.advance(0.05)


def test_without_data_it_uses_the_seed_with_no_confidence() -> None:
    est = LatencyEstimator()
    assert est.predict(8, 0.0) == DEFAULT_SEED.predict(8)
    assert est.confidence(0.0) == 0.0
    seeded = LatencyEstimator(seed=LatencyModel(0.02, 0.001))
    assert seeded.predict(10, 0.0) == pytest.approx(0.03)


def test_learns_a_linear_backend_at_the_percentile() -> None:
    clock = FakeClock()
    est = LatencyEstimator(percentile=95)
    feed(est, clock, a=0.030, c=0.004, n=400)
    assert est.confidence(clock.now()) > 0.8
    for b in (1, 8, 32):
        mean = 0.030 + 0.004 * b
        p95 = mean * (1 + 0.1 * 1.645)  # the noise is 10% of the mean, normal
        assert est.predict(b, clock.now()) == pytest.approx(p95, rel=0.12)


def test_a_higher_percentile_predicts_more() -> None:
    clock = FakeClock()
    p50, p99 = LatencyEstimator(percentile=50), LatencyEstimator(percentile=99)
    for est in (p50, p99):
        feed(est, clock, 0.03, 0.004, 300, seed=1)
    assert p99.predict(16, clock.now()) > p50.predict(16, clock.now()) * 1.1


def test_it_forgets_and_follows_a_backend_that_slows_down() -> None:
    clock = FakeClock()
    est = LatencyEstimator(half_life=10.0)
    feed(est, clock, 0.010, 0.001, 300)
    fast = est.predict(16, clock.now())
    clock.advance(60)
    feed(est, clock, 0.050, 0.005, 200, seed=2)  # 10 s of a slower backend
    slow = est.predict(16, clock.now())
    assert slow == pytest.approx((0.050 + 0.005 * 16) * 1.16, rel=0.2)
    assert slow > 3 * fast


def test_one_batch_size_keeps_the_seed_slope() -> None:
    clock = FakeClock()
    est = LatencyEstimator(seed=LatencyModel(0.02, 0.002))
    for _ in range(200):
        est.observe(4, 0.05, clock.now())
        clock.advance(0.01)
    assert est.predict(4, clock.now()) == pytest.approx(0.05, rel=0.05)
    assert est.model(clock.now()).per_item == pytest.approx(0.002, rel=0.05)


def test_bad_samples_are_ignored() -> None:
    est = LatencyEstimator()
    for size, secs in ((0, 0.1), (4, -1.0), (4, math.nan), (4, math.inf)):
        est.observe(size, secs, 0.0)
    assert est.confidence(0.0) == 0.0


def test_invalid_settings_and_models_are_refused() -> None:
    with pytest.raises(ValueError):
        LatencyEstimator(percentile=100)
    with pytest.raises(ValueError):
        LatencyEstimator(half_life=0)
    with pytest.raises(ValueError):
        LatencyModel(-1.0, 0.0)
    with pytest.raises(ValueError):
        LatencyModel(0.0, math.nan)


@settings(max_examples=150, deadline=None)
@given(
    samples=st.lists(
        st.tuples(st.integers(1, 256), st.floats(0, 10, allow_nan=False), st.floats(0, 1000)),
        max_size=60,
    ),
    percentile=st.floats(1, 99.9),
)
def test_predictions_are_finite_non_negative_and_grow_with_batch_size(
    samples: list[tuple[int, float, float]], percentile: float
) -> None:
    est = LatencyEstimator(percentile=percentile)
    for size, secs, t in sorted(samples, key=lambda s: s[2]):
        est.observe(size, secs, t)
    now = max((s[2] for s in samples), default=0.0)
    preds = [est.predict(b, now) for b in (1, 2, 8, 64, 256)]
    assert all(math.isfinite(p) and p >= 0 for p in preds)
    assert preds == sorted(preds)
    assert 0.0 <= est.confidence(now) < 1.0


def test_a_long_idle_period_keeps_what_was_known_and_does_not_break() -> None:
    """Ten hours without traffic: weights must not underflow into NaN (a broken estimator
    would fail every later request of the policy), and the first samples after the idle spell
    refine what was known rather than fall back to the default guess."""
    est = LatencyEstimator(half_life=60.0)  # the default seed: a flat 100 ms
    for i in range(200):
        est.observe(1 + i % 8, 0.010 + 0.002 * (1 + i % 8), float(i) / 10)
    learnt = est.predict(4, 20.0)
    assert learnt < 0.030  # much faster than the seed
    later = 10 * 3600.0
    assert est.predict(4, later) == pytest.approx(learnt, rel=0.01)  # an idle queue keeps it
    est.observe(4, 0.020, later)  # one new sample: it outweighs the old ones...
    after = est.predict(4, later + 1.0)  # (refits are at most every 0.5 s)
    assert after < 0.030  # ...but is blended with what was known, not with the 100 ms guess
    assert after > learnt


def test_a_new_fleet_seed_replaces_the_local_anchor() -> None:
    est = LatencyEstimator(half_life=1.0)
    for i in range(100):
        est.observe(2, 0.010, float(i) / 100)
    est.set_seed(LatencyModel(0.200, 0.0))  # the fleet says the backend got much slower
    est.observe(2, 0.010, 1000.0)  # one sample, ages after the others: little confidence
    assert est.predict(2, 1000.0) > 0.100
