"""Waiting for something to happen, instead of sleeping for a guessed time.

`eventually(cond, timeout, what)` polls `cond` until it is true and returns how long that
took; past `timeout` seconds the test fails, naming `what` it was waiting for (a string, or a
function giving one, e.g. with what was observed meanwhile) and what `cond` last returned. On
a quick machine it returns as soon as the thing has happened; on a loaded one it waits up to
`timeout`, which is a bound on a hang, not a performance target.

`eventually_async` is the same inside an event loop: it sleeps with asyncio (the code under
test runs meanwhile), and `cond` may be a coroutine function (`store.replicas`).

A sleep whose point is time passing (nothing changes during X, past a TTL, a client pausing)
is not a wait on a condition: keep it, and say why next to it.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

What = str | Callable[[], str]


def _fail(what: What, timeout: float, last: Any) -> None:
    shown = repr(last)
    if len(shown) > 300:
        shown = shown[:300] + "..."
    said = what if isinstance(what, str) else what()
    pytest.fail(f"{said}: not within {timeout} s (last seen: {shown})")


def eventually(
    cond: Callable[[], Any], timeout: float, what: What, *, interval: float = 0.02
) -> float:
    """Poll `cond` until it returns something true; the seconds it took. Fails the test past
    `timeout` seconds (after one last look at `cond`)."""
    start = time.monotonic()
    while True:
        last = cond()
        if last:
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            _fail(what, timeout, last)
        time.sleep(interval)


async def eventually_async(
    cond: Callable[[], Any | Awaitable[Any]],
    timeout: float,
    what: What,
    *,
    interval: float = 0.01,
) -> float:
    """`eventually` in an event loop: `cond` may return an awaitable, which is awaited."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        last = cond()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return loop.time() - start
        if loop.time() - start > timeout:
            _fail(what, timeout, last)
        await asyncio.sleep(interval)
