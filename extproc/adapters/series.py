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
from typing import Generic, TypeVar, cast

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
        # The first bucket whose upper bound is >= amount; a NaN is in none, and so not in
        # the count, but makes the sum NaN, as prometheus_client does (red team 22).
        if not math.isnan(amount):
            self.counts[bisect_left(self.bounds, amount)] += 1
        self.sum += amount


S = TypeVar("S", CounterSeries, GaugeSeries, HistogramSeries)
V = TypeVar("V", CounterSeries, GaugeSeries)


class _Family(Collector, Generic[S]):
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
        self._series: dict[tuple[str, ...], S] = {}
        if not self.labelnames:  # its one series shows from the start, as prometheus_client's
            self._series[()] = self._new()
        if registry is not None:
            registry.register(self)

    def _new(self) -> S:
        raise NotImplementedError

    def labels(self, *values: str) -> S:
        key = tuple(str(v) for v in values)
        if len(key) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {key}")
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = self._new()
        return child

    def _only(self) -> S:
        """The series of a family without labels, without building a key (two a request:
        mlproxy_active_streams); ValueError for a family with labels, as labels() says."""
        child = self._series.get(())
        return child if child is not None else self.labels()

    def remove(self, *values: str) -> None:
        del self._series[tuple(str(v) for v in values)]

    def clear(self) -> None:
        self._series.clear()

    def _items(self) -> list[tuple[tuple[str, ...], S]]:
        # One C-level copy: the loop's thread may add a series while /metrics is read.
        return list(self._series.items())

    def describe(self) -> Iterator[Metric]:
        yield self._family()

    def _family(self) -> Metric:
        raise NotImplementedError


class _ValueFamily(_Family[V]):
    """A family whose series are one value each (counters, gauges)."""

    def inc(self, amount: float = 1.0) -> None:
        self._only().inc(amount)

    def _family(self) -> CounterMetricFamily | GaugeMetricFamily:
        raise NotImplementedError

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in self._items():
            family.add_metric(values, child.value)
        yield family


class FastCounter(_ValueFamily[CounterSeries]):
    def _new(self) -> CounterSeries:
        return CounterSeries()

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)


class FastGauge(_ValueFamily[GaugeSeries]):
    def _new(self) -> GaugeSeries:
        return GaugeSeries()

    def set(self, value: float) -> None:
        self._only().set(value)

    def _family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self.name, self.documentation, labels=self.labelnames)


class FastHistogram(_Family[HistogramSeries]):
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

    def observe(self, amount: float) -> None:
        self._only().observe(amount)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        for values, child in self._items():
            counts = list(child.counts)
            total = child.sum
            cumulative = []
            seen = 0
            for le, n in zip(self._les, counts, strict=True):
                seen += n
                cumulative.append((le, seen))
            family.add_metric(values, cumulative, total)
        yield family
