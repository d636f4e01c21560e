"""Real model servers for the protocol tests, each in a virtual environment of its own (their
dependencies are not MLProxy's): KServe's ModelServer and MLServer serving the iris model
(tests/model_servers/), and NVIDIA's tritonclient to drive them.

The environments live under $MLPROXY_TEST_VENVS (default ~/.cache/mlproxy-tests/venvs) and are
installed on first use (a minute or two) from the pins below; a later run with the same pins
reuses them. Without a package index the tests that need them skip, saying so, except under
CI, where they fail.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from bench.peers.procs import stop_tree
from bench.peers.systems import ensure_venv
from mlproxy.stack import Child, StackError
from mlproxy_common import ports

SERVERS = Path(__file__).resolve().parent / "model_servers"
# The real servers and clients, bounded so that a fresh install is reproducible.
PINS: dict[str, tuple[str, ...]] = {
    "kserve": ("kserve>=0.21,<0.22", "scikit-learn>=1.5,<2", "tritonclient[http]>=2.50,<3"),
    # mlserver 1.7 calls asyncio.get_event_loop() before setting a loop, which uvloop 0.22+
    # refuses (bench/peers/systems.py).
    "mlserver": ("mlserver>=1.7,<1.8", "uvloop>=0.19,<0.22", "scikit-learn>=1.5,<2"),
}


def venv_root() -> Path:
    default = Path.home() / ".cache" / "mlproxy-tests" / "venvs"
    return Path(os.environ.get("MLPROXY_TEST_VENVS", default))


def server_venv(name: str) -> Path:
    """The environment `name` (PINS), installed if needed; skips (fails under CI) if it cannot
    be installed."""
    try:
        return ensure_venv(name, venv_root(), lambda m: print(m, file=sys.stderr), PINS[name])
    except StackError as err:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{err} (the real-server tests install {name} from the package index)")


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


@contextmanager
def real_server(name: str, run_dir: Path) -> Iterator[str]:
    """KServe's ModelServer ("kserve") or MLServer ("mlserver") serving "iris" on a free
    loopback port; yields its base URL and stops it (and every process it started) after."""
    venv = server_venv(name)
    reserved = [ports.reserve() for _ in range(3)]
    http_port, grpc_port, metrics_port = reserved
    run_dir.mkdir(parents=True, exist_ok=True)
    if name == "kserve":
        argv = [str(venv / "bin" / "python"), str(SERVERS / "kserve_iris.py")]
        argv += [str(http_port), str(grpc_port)]
    else:
        work = run_dir / "mlserver"
        work.mkdir(exist_ok=True)
        settings = {
            "host": "127.0.0.1",
            "http_port": http_port,
            "grpc_port": grpc_port,
            "metrics_port": metrics_port,
            "debug": False,
        }
        model = {"name": "iris", "implementation": "mlserver_iris.IrisRuntime"}
        (work / "settings.json").write_text(json.dumps(settings))
        (work / "model-settings.json").write_text(json.dumps(model))
        argv = [str(venv / "bin" / "mlserver"), "start", str(work)]
    url = f"http://127.0.0.1:{http_port}"
    child = Child(
        name,
        argv,
        run_dir / f"{name}.log",
        env={"PYTHONPATH": str(SERVERS)},
        ready=lambda: _ready(f"{url}/v2/models/iris/ready"),
    )
    try:
        child.start()
        child.wait_ready(timeout=180.0)
        yield url
    finally:
        stop_tree(child)
        for port in reserved:
            ports.release(port)


def triton_client(url: str, requests: Sequence[dict[str, Any]], **job: Any) -> list[dict[str, Any]]:
    """Every request sent at once with tritonclient (tests/model_servers/triton_client.py, in
    the kserve environment) to `url` ("host:port[/base]"); one result per request, in order."""
    import subprocess

    venv = server_venv("kserve")
    doc = {"url": url, "model": "iris", "output": "output-0", **job, "requests": list(requests)}
    done = subprocess.run(
        [str(venv / "bin" / "python"), str(SERVERS / "triton_client.py")],
        input=json.dumps(doc),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if done.returncode:
        raise AssertionError(f"triton_client.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in done.stdout.splitlines()]
