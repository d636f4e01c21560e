"""Processes left behind: every process a test session (or a stress run) starts inherits a
marker in its environment, so whatever still carries it after the session is a leftover, even
one whose parent died and that the kernel moved to init. Stdlib only (tests/tools uses it)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def marked(name: str, value: str) -> list[tuple[int, str]]:
    """This user's processes (but this one) whose environment has name=value, with commands."""
    needle = f"{name}={value}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # exited, waiting for its parent to collect the status
        except (OSError, IndexError):  # gone meanwhile, or another user's
            continue
        out.append((int(entry.name), cmd.strip()))
    return out


def leftovers(name: str, value: str, grace: float = 10.0) -> list[tuple[int, str]]:
    """Marked processes still alive after `grace` seconds (they may be on their way out)."""
    deadline = time.monotonic() + grace
    while (found := marked(name, value)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return found
