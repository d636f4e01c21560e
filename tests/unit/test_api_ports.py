"""The API's routes depend on the storage ports only: the routers, the domain and the in-memory
adapters load in a fresh interpreter without loading redis-py at all (the composition root,
controlplane/app.py, is what knows Redis)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

REDIS_FREE = [
    "controlplane.api.deps",
    "controlplane.api.fleet",
    "controlplane.api.health",
    "controlplane.api.policies",
    "controlplane.api.store",
    "controlplane.api.ui",
    "controlplane.domain.ports",
    "controlplane.domain.records",
    "controlplane.domain.tuner",
    "controlplane.adapters.memory",
]


def loaded_redis_modules(modules: list[str]) -> list[str]:
    code = (
        "import importlib, json, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'redis')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    found: list[str] = json.loads(out.stdout)
    return found


def test_the_routes_domain_and_memory_adapters_load_without_redis() -> None:
    assert loaded_redis_modules(REDIS_FREE) == []


def test_the_check_sees_redis_when_it_is_loaded() -> None:
    assert "redis" in loaded_redis_modules(["controlplane.adapters.redis_store"])
