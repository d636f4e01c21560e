"""Watchers for what stalls the whole ext_proc process: event loop lag and garbage collection.

Adaptive batching sends a batch's head close to its deadline, so a process that stops for
longer than the policy's margin makes requests late whatever the plan was. These two
histograms (`mlproxy_event_loop_lag_seconds`, `mlproxy_gc_pause_seconds`) say whether and why.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections import deque
from typing import Any

from extproc.adapters.metrics import PrometheusMetrics

__all__ = ["StallWatch"]


class StallWatch:
    def __init__(self, metrics: PrometheusMetrics, every: float = 0.01) -> None:
        self._metrics = metrics
        self._every = every
        self._task: asyncio.Task[None] | None = None
        self._gc_started: float | None = None
        # Pauses wait here until the watcher publishes them: the GC callback runs inside a
        # collection, which may start while any thread (a /metrics scrape) holds the
        # histogram's lock, so it must take no lock itself (prometheus/client_python#363).
        self._pauses: deque[tuple[str, float]] = deque(maxlen=10_000)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())
        gc.callbacks.append(self._on_gc)

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._on_gc)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self._every
            await asyncio.sleep(self._every)
            self._metrics.loop_lag.observe(max(0.0, loop.time() - due))
            self.publish()

    def publish(self) -> None:
        """Move the garbage collections seen so far into the histogram."""
        while self._pauses:
            generation, took = self._pauses.popleft()
            self._metrics.gc_pause.labels(generation).observe(took)

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            took = time.perf_counter() - self._gc_started
            self._gc_started = None
            self._pauses.append((str(info.get("generation", "?")), took))  # no lock taken
