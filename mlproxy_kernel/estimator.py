"""Latency estimator: learns a backend's batch time t(b) at a percentile. Pure, clock-injected.

Model: t_p(b) = (a + c*b) * f_p, where a + c*b is a weighted least-squares line through the
observed (batch size, seconds) samples and f_p the p-th weighted percentile of observed /
fitted (backend noise grows with the batch time), so the estimate is at the policy's
percentile, not the mean. Samples are weighted by age relative to the newest one, with a
half-life, so the estimate follows a backend that changes (and an idle spell forgets nothing);
at most `max_samples` are kept. With few samples the estimate leans on a prior: the last fit
made with n_eff >= prior_strength, else the seed (the control plane's fleet-wide fit, or a
conservative default); the data's weight is n_eff / (n_eff + prior_strength), which is also
the reported confidence. `floor` is the same line at a low percentile: what a batch takes
when the backend starts it at once.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

__all__ = ["LatencyEstimator", "LatencyModel"]


@dataclass(frozen=True, slots=True)
class LatencyModel:
    """t(b) = base + per_item * b (seconds), at some percentile."""

    base: float
    per_item: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.base) and math.isfinite(self.per_item)):
            raise ValueError(f"latency model must be finite: {self}")
        if self.base < 0 or self.per_item < 0:
            raise ValueError(f"latency model must not be negative: {self}")

    def predict(self, size: int) -> float:
        return self.base + self.per_item * size


# The low percentile of observed / fitted that stands for "started at once, no queueing".
FLOOR_PERCENTILE = 10.0

# Without data or a fleet fit: assume a slow backend, so that the first batches are dispatched
# early rather than late.
DEFAULT_SEED = LatencyModel(base=0.100, per_item=0.0)


class LatencyEstimator:
    def __init__(
        self,
        percentile: float = 95.0,
        seed: LatencyModel = DEFAULT_SEED,
        half_life: float = 60.0,
        max_samples: int = 512,
        prior_strength: float = 20.0,
        refit_every: float = 0.5,
    ) -> None:
        if not 0 < percentile < 100:
            raise ValueError("percentile must be in (0, 100)")
        if half_life <= 0 or max_samples < 2 or prior_strength <= 0:
            raise ValueError("half_life, max_samples and prior_strength must be positive")
        self.percentile = percentile
        self.seed = seed
        self.half_life = half_life
        self.prior_strength = prior_strength
        self.refit_every = refit_every  # seconds: ages move weights slowly, so refit rarely
        self._changes = 0  # samples or seed changed since the last fit
        self._samples: deque[tuple[float, int, float]] = deque(maxlen=max_samples)
        # (at, model at the percentile, n_eff, model at FLOOR_PERCENTILE)
        self._fit: tuple[float, LatencyModel, float, LatencyModel] | None = None
        self._anchor: LatencyModel | None = None
        # (the fit it was made from, model()): asked on every poll, the same until a refit
        self._blend: tuple[object, LatencyModel] | None = None

    def observe(self, size: int, seconds: float, now: float) -> None:
        """One backend call of `size` instances took `seconds`."""
        if size < 1 or not math.isfinite(seconds) or seconds < 0:
            return  # nothing to learn from; never poison the fit
        self._samples.append((now, size, seconds))
        self._changes += 1

    def set_seed(self, seed: LatencyModel) -> None:
        """A new seed (the fleet's fit) replaces what this estimator anchored on."""
        self.seed = seed
        self._anchor = None
        self._fit = None
        self._changes = 0

    def _fit_now(self, now: float) -> tuple[LatencyModel, float, LatencyModel]:
        fit = self._fit
        if fit is not None and self._fresh(fit[0], now):
            return fit[1], fit[2], fit[3]
        self._changes = 0
        if not self._samples:
            model, n_eff, floor = self.seed, 0.0, self.seed
        else:
            data = np.asarray(self._samples, dtype=np.float64)
            times, sizes, secs = data[:, 0], data[:, 1], data[:, 2]
            # Weights relative to the newest sample (which weighs 1), so that they never all
            # underflow to zero however long the queue was idle (n_eff does not depend on
            # their scale): an idle queue keeps what it knew.
            newest = float(times.max())
            w = np.power(0.5, np.maximum(newest - times, 0.0) / self.half_life)
            n_eff = float(w.sum() ** 2 / (w * w).sum())
            try:
                model, floor = self._fit_line(sizes, secs, w)
            except ValueError:  # not finite: never poison the rule with it
                model, n_eff, floor = self.seed, 0.0, self.seed
            if n_eff >= self.prior_strength:
                self._anchor = model  # what the data said when it was sure
        self._fit = (now, model, n_eff, floor)
        return model, n_eff, floor

    def _fresh(self, fitted_at: float, now: float) -> bool:
        """Whether the last fit still stands: refitting costs a numpy pass over the samples,
        and with many samples one more moves the fit little, so it is redone after
        `refit_every` seconds or 8 new samples (after every sample while there are few)."""
        if not 0 <= now - fitted_at < self.refit_every:
            return False
        changes = self._changes
        return changes == 0 or (changes < 8 and len(self._samples) > 32)

    def _fit_line(
        self, sizes: np.ndarray, secs: np.ndarray, w: np.ndarray
    ) -> tuple[LatencyModel, LatencyModel]:
        total = w.sum()
        mean_b = float((w * sizes).sum() / total)
        mean_t = float((w * secs).sum() / total)
        var_b = float((w * (sizes - mean_b) ** 2).sum() / total)
        if var_b > 1e-9:
            slope = float((w * (sizes - mean_b) * (secs - mean_t)).sum() / total) / var_b
        else:
            slope = self.seed.per_item  # one batch size seen: the slope cannot be learnt
        slope = max(slope, 0.0)
        intercept = max(mean_t - slope * mean_b, 0.0)
        # Backend noise grows with the batch time, so the margin is relative: the p-th
        # percentile of observed / fitted, applied to the whole line.
        fitted = np.maximum(intercept + slope * sizes, 1e-6)
        ratio = secs / fitted
        factor = max(_weighted_percentile(ratio, w, self.percentile), 0.0)
        low = max(_weighted_percentile(ratio, w, FLOOR_PERCENTILE), 0.0)
        return (
            LatencyModel(base=intercept * factor, per_item=slope * factor),
            LatencyModel(base=intercept * low, per_item=slope * low),
        )

    def fitted(self, now: float) -> LatencyModel | None:
        """The data's own fit at the percentile, without the seed; None with no samples."""
        if not self._samples:
            return None
        return self._fit_now(now)[0]

    def floor(self, now: float) -> LatencyModel | None:
        """The fit at a low percentile (FLOOR_PERCENTILE) of the samples: what a batch takes
        when the backend starts it at once. A call much slower than this waited at the
        backend. None with no samples."""
        if not self._samples:
            return None
        return self._fit_now(now)[2]

    def confidence(self, now: float) -> float:
        """0 with no data, towards 1 with many recent samples."""
        n_eff = self._fit_now(now)[1]
        return n_eff / (n_eff + self.prior_strength)

    def model(self, now: float) -> LatencyModel:
        """The blend of the data's fit and a prior, by confidence. The prior is the last fit
        made with confidence of at least one half, if any (after an idle spell the few new
        samples refine what was known, rather than fall back to a guess), else the seed."""
        fitted, n_eff, _ = self._fit_now(now)
        fit = self._fit  # a new one at every refit and seed; the anchor changes only with it
        blend = self._blend
        if blend is not None and blend[0] is fit:
            return blend[1]
        prior = self._anchor if self._anchor is not None else self.seed
        k = n_eff / (n_eff + self.prior_strength)
        model = LatencyModel(
            base=k * fitted.base + (1 - k) * prior.base,
            per_item=k * fitted.per_item + (1 - k) * prior.per_item,
        )
        self._blend = (fit, model)
        return model

    def predict(self, size: int, now: float) -> float:
        """Seconds a batch of `size` instances takes, at the percentile."""
        return self.model(now).predict(size)


def _weighted_percentile(values: np.ndarray, weights: np.ndarray, percentile: float) -> float:
    order = np.argsort(values)
    v, w = values[order], weights[order]
    cum = np.cumsum(w)
    target = percentile / 100.0 * cum[-1]
    index = int(np.searchsorted(cum, target, side="left"))
    return float(v[min(index, len(v) - 1)])
