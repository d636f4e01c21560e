"""Policies from a YAML/JSON file, reloaded when the file changes (e.g. a mounted ConfigMap).

This is one implementation of the policy source port; the Redis source replaces it. An invalid
file at start is fatal; an invalid file later is logged and the last good policies stay in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from mlproxy_kernel.policy import Policy, PolicyFileError, load_policy_file

__all__ = ["FilePolicySource"]

log = logging.getLogger(__name__)


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks, as Kubernetes' ConfigMap swaps do
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class FilePolicySource:
    def __init__(self, path: str | Path, interval: float = 2.0) -> None:
        self.path = Path(path)
        self.interval = interval
        self._stamp: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    def load(self) -> list[Policy]:
        """Read the file now; PolicyFileError if it is invalid."""
        self._stamp = _stamp(self.path)
        return load_policy_file(self.path)

    def watch(self, apply: Callable[[Sequence[Policy]], None]) -> None:
        """Poll the file and call `apply` with the new policies whenever it changes."""
        self._task = asyncio.get_running_loop().create_task(self._watch(apply))

    async def _watch(self, apply: Callable[[Sequence[Policy]], None]) -> None:
        while True:
            await asyncio.sleep(self.interval)
            stamp = _stamp(self.path)
            if stamp == self._stamp:
                continue
            self._stamp = stamp
            try:
                policies = load_policy_file(self.path)
            except PolicyFileError as err:  # every read or parse error is one of these
                log.error(
                    "policy file changed but is invalid; keeping the current policies: %s", err
                )
                continue
            apply(policies)
            log.info("policy file reloaded: %d policies", len(policies))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
