"""Metrics of the request path without a lock: plain counts, exported through a collector.

prometheus_client's Counter, Gauge and Histogram take a lock on every step (a histogram
observation takes two, and walks its buckets in Python); a request takes a dozen such steps,
about 20 us of ext_proc's CPU per request (bench/servicer_cost.py). The families here keep
each series' counts as plain Python numbers that the event loop's thread steps, and a
prometheus_client collector reads them when /metrics is scraped, from the HTTP server's
thread: every number it reads is one the loop wrote whole (the GIL), each family's series
are read from one copy of its table (a series may be added or removed meanwhile), and a
histogram's count is its +Inf bucket, so the two agree (its sum may be one observation
ahead or behind, as prometheus_client's may).

Only one thread may step a family (the event loop's); a metric stepped from other threads (a
garbage collector's callback, say) stays a prometheus_client metric. What /metrics shows is
what prometheus_client shows for the same metric, without the `_created` samples.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import cast

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

# How prometheus_client writes a bucket's bound ("0.005", "1.0", "+Inf").
_le = cast(Callable[[float], str], floatToGoString)

__all__ = ["CounterSeries", "FastCounter", "FastGauge", "FastHistogram", "GaugeSeries"]


class CounterSeries:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError("counters can only be incremented by non-negative amounts")
        self.value += amount


class GaugeSeries:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount

    def set(self, value: float) -> None:
        self.value = float(value)


class HistogramSeries:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: list[float]) -> None:
        self.bounds = bounds  # upper bounds, the last one +Inf
        self.counts = [0] * len(bounds)
        self.sum = 0.0

    def observe(self, amount: float) -> None:
        # The first bucket whose upper bound is >= amount (a NaN counts in the first).
        self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


class _Family(Collector):
    """One metric's labelled series, registered as a collector in `registry`."""

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._series: dict[tuple[str, ...], object] = {}
        if registry is not None:
            registry.register(self)

    def _new(self) -> object:
        raise NotImplementedError

    def _child(self, values: tuple[str, ...]) -> object:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
        child = self._series.get(values)
        if child is None:
            child = self._series[values] = self._new()
        return child

    def remove(self, *values: str) -> None:
        del self._series[tuple(str(v) for v in values)]

    def clear(self) -> None:
        self._series.clear()

    def _items(self) -> list[tuple[tuple[str, ...], object]]:
        # One C-level copy: the loop's thread may add a series while /metrics is read.
        return list(self._series.items())

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def _family(self) -> Metric:
        raise NotImplementedError


class FastCounter(_Family):
    def _new(self) -> CounterSeries:
        return CounterSeries()

    def labels(self, *values: str) -> CounterSeries:
        child = self._child(tuple(str(v) for v in values))
        assert isinstance(child, CounterSeries)
        return child

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in self._items():
            assert isinstance(child, CounterSeries)
            family.add_metric(values, child.value)
        yield family


class FastGauge(_Family):
    def _new(self) -> GaugeSeries:
        return GaugeSeries()

    def labels(self, *values: str) -> GaugeSeries:
        child = self._child(tuple(str(v) for v in values))
        assert isinstance(child, GaugeSeries)
        return child

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def set(self, value: float) -> None:
        self.labels().set(value)

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in self._items():
            assert isinstance(child, GaugeSeries)
            family.add_metric(values, child.value)
        yield family


class FastHistogram(_Family):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = (),
        registry: CollectorRegistry | None = None,
    ) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        self._bounds = bounds
        self._les = [_le(b) for b in bounds]
        super().__init__(name, documentation, labelnames, registry)

    def _new(self) -> HistogramSeries:
        return HistogramSeries(self._bounds)

    def labels(self, *values: str) -> HistogramSeries:
        child = self._child(tuple(str(v) for v in values))
        assert isinstance(child, HistogramSeries)
        return child

    def observe(self, amount: float) -> None:
        self.labels().observe(amount)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in self._items():
            assert isinstance(child, HistogramSeries)
            counts = list(child.counts)
            total = child.sum
            cumulative = []
            seen = 0
            for le, n in zip(self._les, counts, strict=True):
                seen += n
                cumulative.append((le, seen))
            family.add_metric(values, cumulative, total)
        yield family
