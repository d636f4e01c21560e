"""Warnings at most once per kind and interval: hostile clients, peers or Redis contents
must not flood the log."""

from __future__ import annotations

import logging
import math
import time

__all__ = ["Throttled"]


class Throttled:
    """Logs a warning per kind at most once every `every` seconds to `log`, with how many were
    left out since. Kinds may come from hostile data, so the memory of them stays bounded."""

    MAX_KINDS = 1024

    def __init__(self, log: logging.Logger, every: float = 10.0) -> None:
        self._log = log
        self._every = every
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -math.inf) < self._every:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        if len(self._last) > self.MAX_KINDS:
            self._last.clear()
            self._skipped.clear()
        skipped = self._skipped.pop(kind, 0)
        self._last[kind] = now
        more = f" ({skipped} more like it in the last {self._every:.0f} s)" if skipped else ""
        self._log.warning("%s%s", message, more)
