"""Where a policy request's time goes inside ext_proc, measured in the real process.

`bench/overhead.py --probe` sets MLPROXY_BENCH_PROBE to a file in the ext_proc's environment;
bench/without_site/sitecustomize.py then calls `install(file)` at start-up. It times, per
request or batch: the wait for the body after the headers' answer (`body`), how late the
batch's wait timer ran after the time it was set for (`timer late`), and the batch call (from
the merge to the split answers, `backend call`). At exit the process writes their 10th, 50th
and 90th percentiles in milliseconds to the file, as JSON. For benchmarks only: the wrappers
cost a few microseconds each.
"""

from __future__ import annotations

import atexit
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any


def _percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    n = len(ordered)
    return {
        "n": n,
        **{f"p{q}": round(ordered[min(n - 1, n * q // 100)] * 1000, 3) for q in (10, 50, 90)},
    }


def install(path: str) -> None:
    """Wrap the three steps, and write what they took to `path` at exit."""
    from extproc.adapters.servicer import ExtProcServicer
    from extproc.runtime.batcher import Batcher

    times: dict[str, list[float]] = {"body": [], "timer late": [], "backend call": []}
    on_timer = Batcher._on_timer

    def timed(step: str, method: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        async def wrapper(self: Any, *args: Any) -> Any:
            start = time.monotonic()
            try:
                return await method(self, *args)
            finally:
                times[step].append(time.monotonic() - start)

        return wrapper

    def timed_on_timer(self: Batcher) -> None:
        times["timer late"].append(self.clock.now() - self._timer_at)
        on_timer(self)

    ExtProcServicer._read_body = timed("body", ExtProcServicer._read_body)  # type: ignore[method-assign]
    Batcher._on_timer = timed_on_timer  # type: ignore[method-assign]
    Batcher._execute = timed("backend call", Batcher._execute)  # type: ignore[method-assign]

    def write() -> None:
        with open(path, "w", encoding="utf-8") as out:
            json.dump({k: _percentiles(v) for k, v in times.items() if v}, out)

    atexit.register(write)
