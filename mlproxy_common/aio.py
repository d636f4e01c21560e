"""Small asyncio helpers shared by the ext_proc server and the control plane."""

from __future__ import annotations

import asyncio
import logging

__all__ = ["raise_if_cancelling", "stop_task"]

log = logging.getLogger(__name__)


def raise_if_cancelling() -> None:
    """Raise CancelledError if the current task has been asked to stop.

    A loop that catches errors and tries again must call this in its except clauses: a library
    interrupted by a cancellation may raise its own error in place of the CancelledError
    (redis-py can, when the connection it was using breaks at the same moment), and a loop that
    treats that error as one more failed round never ends: the process then ignores SIGTERM.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def stop_task(task: asyncio.Task[None], timeout: float = 5.0) -> None:
    """Cancel `task` and wait for it, at most `timeout` seconds (then log and go on, so a task
    that will not stop cannot hold a shutdown up)."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        log.warning(
            "task %s did not stop within %.0f s of being cancelled", task.get_name(), timeout
        )
        return
    if not task.cancelled() and task.exception() is not None:
        log.warning("task %s ended with %r", task.get_name(), task.exception())
