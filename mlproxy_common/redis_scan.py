"""Keys from a Redis SCAN and their values, bounded: what Redis holds is hostile (every
replica's Redis user writes there), a key name may be 512 MB and a value as much."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from mlproxy_kernel import keys

__all__ = ["bounded_values", "scan_names"]

log = logging.getLogger(__name__)


class _Throttled:
    """One warning per kind (a few fixed kinds per pattern) every `every` seconds."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._last: dict[str, float] = {}

    def warning(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -self.every) >= self.every:
            self._last[kind] = now
            log.warning("%s", message)


_warn = _Throttled()

# Keys asked for per SCAN call: a page of oversized names costs at most this many of them.
SCAN_COUNT = 100


async def scan_names(redis: Any, pattern: str, max_names: int) -> list[Any]:
    """The names matching `pattern`, at most `max_names` of them; names longer than
    `keys.MAX_KEY_NAME_BYTES` are skipped (never sent back to Redis or parsed), and the scan
    stops once `keys.MAX_SCANNED_NAME_BYTES` of names came back. Each is logged (throttled)."""
    names: list[Any] = []
    seen = skipped = 0
    async for name in redis.scan_iter(match=pattern, count=SCAN_COUNT):
        size = len(name)
        seen += size
        if size > keys.MAX_KEY_NAME_BYTES:
            skipped += 1
        else:
            names.append(name)
            if len(names) >= max_names:
                _warn.warning(
                    f"many:{pattern}",
                    f"more than {max_names} keys {pattern} in Redis: the rest are not read; "
                    "check who writes there",
                )
                break
        if seen > keys.MAX_SCANNED_NAME_BYTES:
            _warn.warning(
                f"bytes:{pattern}",
                f"the names of keys {pattern} in Redis exceed {keys.MAX_SCANNED_NAME_BYTES} "
                "bytes: the rest are not read; check who writes there",
            )
            break
    if skipped:
        _warn.warning(
            f"long:{pattern}",
            f"{skipped} keys {pattern} in Redis have names over {keys.MAX_KEY_NAME_BYTES} "
            "bytes, which no replica writes: skipped; check who writes there",
        )
    return names


# Values read per pipeline; the event loop gets a turn between two.
CHUNK = 100


async def bounded_values(
    redis: Any, names: list[Any], limit: int
) -> AsyncIterator[list[tuple[Any, bytes | str]]]:
    """The values of `names`, a chunk at a time, each read only up to `limit` bytes plus one
    (GETRANGE: a bulky value is never fetched whole), so a value longer than `limit` comes
    back `limit + 1` long for the caller to skip. Keys gone since the scan, and keys that hold
    no string, are left out."""
    for i in range(0, len(names), CHUNK):
        chunk = names[i : i + CHUNK]
        async with redis.pipeline(transaction=False) as pipe:
            for name in chunk:
                pipe.getrange(name, 0, limit)  # one byte past the bound tells a longer one
            values = await pipe.execute(raise_on_error=False)
        yield [
            (name, raw)
            for name, raw in zip(chunk, values, strict=True)
            if isinstance(raw, bytes | str) and raw  # not an error, not gone
        ]
        await asyncio.sleep(0)  # let the requests in between
