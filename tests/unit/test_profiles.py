"""Model profiles: the paper's linear fits, with noise that keeps the mean."""

from __future__ import annotations

import random
import statistics

import pytest

from bench.profiles import PROFILES


def test_the_papers_fits() -> None:
    assert PROFILES["iris"].mean(1) == pytest.approx(0.008615)
    assert PROFILES["resnet"].mean(10) == pytest.approx(1.233)


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_samples_are_positive_and_average_to_the_mean(name: str) -> None:
    profile = PROFILES[name]
    rng = random.Random(1)
    samples = [profile.sample(8, rng) for _ in range(20_000)]
    assert min(samples) > 0
    assert statistics.fmean(samples) == pytest.approx(profile.mean(8), rel=0.01)
    assert statistics.stdev(samples) == pytest.approx(profile.noise * profile.mean(8), rel=0.05)
