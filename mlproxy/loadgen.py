"""A closed-loop HTTP load generator: N requests, C at a time, each answer kept for checking."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp

__all__ = ["Result", "burst", "percentile"]


@dataclass(frozen=True, slots=True)
class Result:
    index: int
    status: int  # 0: no HTTP answer (connection error)
    latency: float  # seconds
    body: bytes
    batch_size: int  # from x-mlproxy-batch-size, 0 if absent


async def burst(
    url: str, bodies: Sequence[bytes], concurrency: int, timeout: float = 30.0
) -> list[Result]:
    """POST every body to url, at most `concurrency` at once; results in body order."""
    results: list[Result | None] = [None] * len(bodies)
    next_index = 0
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)
    ) as session:

        async def worker() -> None:
            nonlocal next_index
            while next_index < len(bodies):
                i = next_index
                next_index += 1
                start = time.perf_counter()
                try:
                    async with session.post(
                        url, data=bodies[i], headers={"Content-Type": "application/json"}
                    ) as resp:
                        body = await resp.read()
                        size = int(resp.headers.get("x-mlproxy-batch-size", "0"))
                        results[i] = Result(i, resp.status, time.perf_counter() - start, body, size)
                except (aiohttp.ClientError, TimeoutError) as err:
                    results[i] = Result(i, 0, time.perf_counter() - start, str(err).encode(), 0)

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
    return [r for r in results if r is not None]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) by nearest rank; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]
