"""The systems under test: MLProxy through the real stack, and the peers, each installed by the
benchmark into a virtual environment of its own and run on a reserved loopback port.

Every peer serves the same model (`models/peer_common.py`: one batch at a time, t(b) = 20 + 2*b
ms with the profile's noise, each instance answered from its own input) behind its own batcher,
configured from the SLA as a user would (`peer_settings`, docs/benchmarks.md explains each choice):

- **bentoml**: a batchable API, `max_batch_size` 64, `max_latency_ms` = the SLA (150): BentoML's
  own latency budget for a request in its batcher; one worker.
- **mlserver**: a custom MLModel runtime with adaptive batching, `max_batch_size` 64,
  `max_batch_time` = a quarter of the SLA (37.5 ms, the project's static baseline rule: three
  quarters left to run the batch); default `parallel_workers` (1 inference process).
- **ray**: one replica, `@serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0375)` (the
  same quarter of the SLA), `max_ongoing_requests` 64 (what Serve asks for: at least
  max_batch_size x max_concurrent_batches), `max_concurrent_batches` 1 (the default).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench.backends import ServerConfig
from bench.peers import procs
from bench.peers.measure import WIRES, Wire
from bench.peers.workload import Workload, expected, instance
from bench.real import BenchConfig, BenchStack
from mlproxy.stack import Child, StackError
from mlproxy_common import ports

__all__ = [
    "PEERS",
    "PINS",
    "MLProxySystem",
    "PeerSystem",
    "System",
    "ensure_venv",
    "mlproxy_policy",
    "peer_settings",
]

MODELS = Path(__file__).resolve().parent / "models"
DEFAULT_VENVS = Path.home() / ".cache" / "mlproxy-bench" / "venvs"

# Every peer's requirements, in one place. mlserver 1.7.1's inference workers call
# asyncio.get_event_loop() before setting a loop, which uvloop 0.22+ turns into an error (the
# model never loads), hence the uvloop bound.
PINS: dict[str, tuple[str, ...]] = {
    "bentoml": ("bentoml>=1.4,<1.5",),
    "mlserver": ("mlserver>=1.7,<1.8", "uvloop>=0.19,<0.22"),
    "ray": ("ray[serve]>=2.50,<3",),
}
PEERS = tuple(PINS)
MLPROXY_ROWS = ("mlproxy-adaptive", "mlproxy-static")
SYSTEMS = (*MLPROXY_ROWS, *PEERS)
MARKER = ".mlproxy-bench-requirements"


def ensure_venv(
    name: str,
    root: Path,
    say: Callable[[str], None],
    requirements: Sequence[str] | None = None,
) -> Path:
    """The virtual environment `name` under `root`, created and installed with
    `requirements` (default: the peer's `PINS[name]`) unless one with exactly those
    requirements is there already; its directory."""
    pins = tuple(PINS[name] if requirements is None else requirements)
    venv = root / name
    wanted = "\n".join(pins) + "\n"
    marker = venv / MARKER
    if marker.exists() and marker.read_text() == wanted and (venv / "bin" / "python").exists():
        return venv
    say(f"installing {name} ({', '.join(pins)}) into {venv} (a few minutes) ...")
    root.mkdir(parents=True, exist_ok=True)
    log = root / f"{name}-install.log"
    with log.open("w") as out:
        for argv in (
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            [str(venv / "bin" / "pip"), "install", "--disable-pip-version-check", *pins],
        ):
            if subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, check=False).returncode:
                raise StackError(f"installing {name} failed: {' '.join(argv)}; see {log}")
    marker.write_text(wanted)
    return venv


@dataclass(frozen=True, slots=True)
class PeerSettings:
    """A peer's batcher settings, from the workload's SLA and max batch size."""

    max_batch: int
    wait_ms: float  # mlserver's max_batch_time, ray's batch_wait_timeout_s (in ms)
    max_latency_ms: int  # bentoml's max_latency_ms
    max_ongoing: int  # ray's max_ongoing_requests


def peer_settings(workload: Workload, wait_ms: float | None = None) -> PeerSettings:
    """A user's settings for the SLA: batches of at most `max_batch`; a batcher's wait a quarter
    of the SLA unless `wait_ms` says otherwise; BentoML's latency budget the SLA itself."""
    return PeerSettings(
        max_batch=workload.max_batch,
        wait_ms=workload.sla_ms / 4 if wait_ms is None else wait_ms,
        max_latency_ms=round(workload.sla_ms),
        max_ongoing=workload.max_batch,
    )


def model_env(workload: Workload, settings: PeerSettings, batch_log: Path) -> dict[str, str]:
    """The environment of every peer's model (models/peer_common.py) and server files."""
    p = workload.profile
    return {
        "PEER_A_MS": repr(p.a_ms),
        "PEER_C_MS": repr(p.c_ms),
        "PEER_NOISE": repr(p.noise),
        "PEER_SEED": str(workload.seed),
        "PEER_BATCH_LOG": str(batch_log),
        "PEER_MAX_BATCH": str(settings.max_batch),
        "PEER_WAIT_MS": repr(settings.wait_ms),
        "PEER_MAX_LATENCY_MS": str(settings.max_latency_ms),
        "PEER_MAX_ONGOING": str(settings.max_ongoing),
        "PYTHONPATH": str(MODELS),
        # no usage reporting, nothing sent off this machine
        "BENTOML_DO_NOT_TRACK": "True",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Ray: the loopback address as the node's, without asking the network
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
    }


def mlserver_files(settings: PeerSettings, port: int, grpc: int, metrics: int) -> dict[str, Any]:
    """MLServer's settings.json and model-settings.json (by file name)."""
    return {
        "settings.json": {
            "host": "127.0.0.1",
            "http_port": port,
            "grpc_port": grpc,
            "metrics_port": metrics,
            "debug": False,  # no per-request access log (MLProxy's Envoy writes none either)
        },
        "model-settings.json": {
            "name": "peer",
            "implementation": "mlserver_runtime.PeerRuntime",
            "max_batch_size": settings.max_batch,
            "max_batch_time": settings.wait_ms / 1000.0,
        },
    }


def mlproxy_policy(label: str, path: str, backend_url: str, workload: Workload) -> dict[str, Any]:
    """The policy of an MLProxy row, as the issue writes it."""
    batching: dict[str, Any]
    if label == "mlproxy-adaptive":
        batching = {"mode": "adaptive", "max_batch_size": workload.max_batch}
    elif label == "mlproxy-static":  # send whatever is queued as soon as the one slot is free
        batching = {
            "mode": "static",
            "max_in_flight": 1,
            "max_wait_ms": 0.5,
            "max_batch_size": workload.max_batch,
        }
    else:
        raise ValueError(f"unknown MLProxy row {label!r}: one of {', '.join(MLPROXY_ROWS)}")
    return {
        "match": {"path": path},
        "backend": {"url": backend_url + path},
        "sla": {"latency_ms": workload.sla_ms, "percentile": 99},
        "batching": batching,
    }


class System:
    """One system under test, started for all its rates: where its clients send, in which
    wire format, and how to get it ready for the next run."""

    name: str
    wire: Wire
    host = "127.0.0.1"
    port: int
    path: str

    def prepare(self, run: int) -> None:
        """Before each rate's run."""

    def batches(self, start: float, end: float) -> np.ndarray:
        """The sizes of the batches the model started in [start, end) (monotonic clock)."""
        return np.zeros(0)

    def roots(self) -> list[int]:
        """The processes whose families serve this system (for their CPU time)."""
        return []


def probe(system: System, run: int, timeout: float = 10.0) -> float | None:
    """One request, its answer checked: seconds it took, or None if it failed or was wrong."""
    x = instance(run, 999_999)
    req = urllib.request.Request(
        f"http://{system.host}:{system.port}{system.path}",
        data=system.wire.body(x),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    began = time.monotonic()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
    except (OSError, urllib.error.URLError):
        return None
    try:
        ok = system.wire.decode(raw) == expected(x)
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return time.monotonic() - began if ok else None


@dataclass
class PeerSystem(System):
    """A peer in its own virtual environment, on reserved loopback ports."""

    name: str
    workload: Workload
    run_dir: Path
    venvs: Path = DEFAULT_VENVS
    wait_ms: float | None = None
    say: Callable[[str], None] = lambda line: None
    child: Child | None = None
    reserved: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.name not in PINS:
            raise ValueError(f"unknown peer {self.name!r}: one of {', '.join(PEERS)}")
        self.run_dir = self.run_dir.resolve()  # the peers run in directories of their own
        self.settings = peer_settings(self.workload, self.wait_ms)
        self.wire = WIRES[{"bentoml": "bentoml", "mlserver": "v2", "ray": "kserve-v1"}[self.name]]
        self.path = {
            "bentoml": "/predict",
            "mlserver": "/v2/models/peer/infer",
            "ray": "/predict",
        }[self.name]
        self.batch_log = self.run_dir / f"{self.name}-batches.log"

    def _reserve(self) -> int:
        port = ports.reserve(self.host)
        self.reserved.append(port)
        return port

    def __enter__(self) -> PeerSystem:
        venv = ensure_venv(self.name, self.venvs, self.say)
        procs.become_subreaper()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.batch_log.unlink(missing_ok=True)
        self.port = self._reserve()
        env = model_env(self.workload, self.settings, self.batch_log)
        work = self.run_dir / self.name
        work.mkdir(exist_ok=True)
        argv: list[str]
        if self.name == "bentoml":
            env["BENTOML_HOME"] = str(work / "bentoml-home")
            argv = [str(venv / "bin" / "bentoml"), "serve", "bentoml_service:Peer"]
            argv += ["--working-dir", str(MODELS), "--host", self.host, "--port", str(self.port)]
        elif self.name == "mlserver":
            files = mlserver_files(self.settings, self.port, self._reserve(), self._reserve())
            for fname, body in files.items():
                (work / fname).write_text(json.dumps(body, indent=1))
            argv = [str(venv / "bin" / "mlserver"), "start", str(work)]
        else:
            argv = [str(venv / "bin" / "python"), str(MODELS / "ray_app.py")]
            argv += ["--port", str(self.port), "--num-cpus", str(os.cpu_count() or 2)]
        self.child = Child(
            self.name,
            argv,
            self.run_dir / f"{self.name}.log",
            env=env,
            ready=lambda: probe(self, 0, timeout=5.0) is not None,
        )
        self.say(f"starting {self.name} on port {self.port} (log {self.child.log_path}) ...")
        try:
            self.child.start()
            self.child.wait_ready(timeout=300.0)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.child is not None:
            left = procs.stop_tree(self.child)
            if left:
                self.say(f"{self.name}: processes {sorted(left)} survived SIGKILL")
        for port in self.reserved:
            ports.release(port)
        self.reserved.clear()

    def roots(self) -> list[int]:
        return [] if self.child is None or self.child.proc is None else [self.child.proc.pid]

    def prepare(self, run: int) -> None:
        """Wait until the server is idle again: a probe answered within the SLA (the previous
        run's backlog gone), for at most two minutes."""
        deadline = time.monotonic() + 120.0
        while time.monotonic() < deadline:
            took = probe(self, run, timeout=self.workload.timeout)
            if took is not None and took < self.workload.sla:
                return
            time.sleep(0.5)
        raise StackError(f"{self.name} is still busy or failing two minutes after a run")

    def batches(self, start: float, end: float) -> np.ndarray:
        try:
            rows = np.loadtxt(self.batch_log, ndmin=2)
        except (OSError, ValueError):
            return np.zeros(0)
        if not rows.size:
            return np.zeros(0)
        sizes: np.ndarray = rows[(rows[:, 0] >= start) & (rows[:, 0] < end), 1]
        return sizes


# Real time (time_scale 1): the fleet tuner runs as in production (a round every 5 s, a policy
# changed at most once a minute, from the last minute's stats), not on `mlproxy bench`'s
# compressed clock.
STACK_CONFIG = BenchConfig(
    replicas=1, backend=ServerConfig(kind="fixed", workers=1), time_scale=1.0
)


@contextlib.contextmanager
def mlproxy_stack(workload: Workload, run_dir: Path) -> Iterator[BenchStack]:
    """The real stack (Redis, control plane, one ext_proc, Envoy) with one emulator per row."""
    with BenchStack(STACK_CONFIG, run_dir, ["adaptive", "static"]) as bench:
        yield bench


@dataclass
class MLProxySystem(System):
    """One MLProxy row on a shared stack: its own policy (a new one each run, so nothing learnt
    carries over) in front of its own emulator, reset each run to a fixed-capacity server with
    one worker and the workload's profile."""

    name: str
    bench: BenchStack
    workload: Workload

    def __post_init__(self) -> None:
        self.wire = WIRES["kserve-v1"]
        self.mode = self.name.removeprefix("mlproxy-")
        self.path = f"/v1/models/peers-{self.mode}:predict"
        self.port = self.bench.stack.envoy_port
        self.policy = mlproxy_policy(
            self.name, self.path, self.bench.emulator_url(self.mode), self.workload
        )

    def roots(self) -> list[int]:
        """Envoy, ext_proc and this row's emulator (not Redis and the control plane, idle
        during a run, nor the other row's emulator)."""
        names = ("envoy", "extproc", f"emulator-{self.mode}")
        return [
            c.proc.pid
            for c in self.bench.stack.children
            if c.proc is not None and c.name.startswith(names)
        ]

    def prepare(self, run: int) -> None:
        self.bench.apply({self.name: self.policy})
        backend = self.bench.config.backend
        assert isinstance(backend, ServerConfig)
        self.bench.emulator(
            self.mode,
            "POST",
            "/admin/reset",
            {
                "profile": self.workload.profile.name,
                "seed": self.workload.seed + run,
                "backend": backend.as_json(),
            },
        )

    def batches(self, start: float, end: float) -> np.ndarray:
        series = self.bench.emulator(self.mode, "GET", "/admin/series")
        rows = np.asarray(series["batches"]["rows"], dtype=float).reshape(-1, 5)
        started = rows[:, 0] + rows[:, 1]  # arrived + waited
        sizes: np.ndarray = rows[(started >= start) & (started < end), 4]
        return sizes
