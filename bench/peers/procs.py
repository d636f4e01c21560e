"""A peer server and every process it starts, stopped together.

The peers start process trees of their own (BentoML's arbiter and its workers, MLServer's
inference pool and multiprocessing helpers, Ray's GCS, raylet, agents and actors, some in
process groups of their own). The harness becomes a child subreaper (Linux
PR_SET_CHILD_SUBREAPER), so a process whose parent dies is re-parented to the harness rather
than to init and stays findable; each peer runs in a new session. Stopping a peer: SIGTERM to
its root (each shuts down gracefully: Ray's driver runs `serve.shutdown()` and `ray.shutdown()`),
then SIGTERM and after a grace period SIGKILL to every process still in its family (the root's
descendants and its session), and the harness reaps the orphans it inherited.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import sys
import time
from pathlib import Path

from mlproxy.stack import Child

__all__ = ["alive", "become_subreaper", "cpu_seconds", "family", "stop_tree"]

log = logging.getLogger(__name__)

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make this process the reaper of its descendants' orphans (Linux); whether it worked."""
    if sys.platform != "linux":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)


def _table(proc: Path = Path("/proc")) -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, session id, state) of every process."""
    out: dict[int, tuple[int, int, str]] = {}
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp session ..."; comm may contain spaces and parentheses
        fields = stat[stat.rfind(")") + 2 :].split()
        out[int(entry.name)] = (int(fields[1]), int(fields[3]), fields[0])
    return out


def family(root: int, table: dict[int, tuple[int, int, str]] | None = None) -> set[int]:
    """`root`, its descendants and the processes of its session (root leads one) that exist."""
    table = _table() if table is None else table
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found = {pid for pid, (_, sid, _) in table.items() if sid == root}
    todo = [root, *found]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid in seen:
            continue
        seen.add(pid)
        if pid in table:
            found.add(pid)
        todo += children.get(pid, ())
    return found


def cpu_seconds(roots: list[int]) -> float:
    """CPU time (user + system) the families of `roots` have used so far, by the processes
    alive now."""
    table = _table()
    pids: set[int] = set()
    for root in roots:
        pids |= family(root, table)
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            stat = (Path("/proc") / str(pid) / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / tick


def alive(pids: set[int]) -> set[int]:
    """Those of `pids` that run (not zombies); reaps the zombies that are this process's."""
    table = _table()
    running = set()
    for pid in pids:
        if pid not in table:
            continue
        if table[pid][2] == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            continue
        running.add(pid)
    return running


def _signal(pids: set[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def stop_tree(child: Child, timeout: float = 30.0, grace: float = 5.0) -> set[int]:
    """Stop `child` and its whole family (see the module docstring); the pids that survived
    SIGKILL (none, normally)."""
    proc = child.proc
    if proc is None:
        return set()
    root = proc.pid
    members = family(root)
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            members |= family(root)
            time.sleep(0.1)
    members |= family(root)
    left = alive(members - {root})
    if left:
        _signal(left, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while (left := alive(left)) and time.monotonic() < deadline:
            time.sleep(0.1)
    if proc.poll() is None:
        log.warning("%s did not stop in %.0f s; killing it", child.name, timeout)
        proc.kill()
        proc.wait()
    left = alive(members - {root} | family(root) - {root})
    if left:
        log.warning("%s: killing %d processes left behind: %s", child.name, len(left), left)
        _signal(left, signal.SIGKILL)
        deadline = time.monotonic() + grace
        while (left := alive(left)) and time.monotonic() < deadline:
            time.sleep(0.1)
    return left
