"""`mlproxy extproc --workers N`: N ext_proc processes on one gRPC port, so one pod uses its cores.

One ext_proc process runs its Python on one core (the GIL). With `--workers N` the command starts
a supervisor, which runs the same command N times as workers and stays out of the request path:

- every worker binds the same gRPC port with SO_REUSEPORT; the kernel spreads Envoy's
  connections (not its streams) over them, so Envoy must open several connections to the pod
  (many sidecars do; one Envoy needs a small `max_concurrent_streams` on the ext_proc cluster:
  docs/operations.md, "Workers");
- each worker is a replica of its own to the control plane and the fleet tuner, with the replica
  id `<id>-w<i>`; with peering on, worker i listens for peers on `--peer-port` + i;
- the supervisor serves every worker's metrics on `--metrics-port`, each series labelled
  `worker="<i>"`, so one scrape sees the pod (each worker serves its own on a loopback port of
  its choosing, which it tells the supervisor through a file in a private directory);
- SIGTERM or SIGINT to the supervisor goes to every worker, which drains as a single process
  does; the supervisor exits 0 when all of them did. A worker that exits by itself is started
  again (after 1 s, doubling to 30 s while it keeps failing within a minute).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

__all__ = [
    "ENV_WORKER_COUNT",
    "ENV_WORKER_INDEX",
    "MAX_WORKERS",
    "WorkerSlot",
    "die_with_parent",
    "merge_metrics",
    "supervise",
    "worker_slot",
]

log = logging.getLogger("mlproxy.workers")

ENV_WORKER_INDEX = "MLPROXY_WORKER_INDEX"
ENV_WORKER_COUNT = "MLPROXY_WORKER_COUNT"
ENV_WORKER_DIR = "MLPROXY_WORKER_DIR"
MAX_WORKERS = 64
# A worker that exits by itself is started again after this long, doubled each time it fails
# again within STABLE_S of its start, up to RESTART_MAX_S.
RESTART_MIN_S = 1.0
RESTART_MAX_S = 30.0
STABLE_S = 60.0
# What a worker's metrics scrape may take (the supervisor asks each in turn), and hold.
SCRAPE_TIMEOUT_S = 2.0
MAX_SCRAPE_BYTES = 16 * 1024 * 1024


class WorkerSlot:
    """What makes worker `index` of `count` different from its siblings."""

    def __init__(self, index: int, count: int, directory: str | None = None) -> None:
        if not 0 <= index < count <= MAX_WORKERS:
            raise ValueError(f"worker {index} of {count}: not a valid worker slot")
        self.index = index
        self.count = count
        self.directory = directory  # where it tells the supervisor its metrics port

    def replica_id(self, base: str) -> str:
        return f"{base}-w{self.index}"

    def metrics_served(self, port: int) -> None:
        """This worker serves its metrics on loopback `port`: tell the supervisor."""
        if self.directory is None:
            return
        path = Path(self.directory) / f"worker-{self.index}.port"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{os.getpid()} {port}")  # the supervisor checks the pid is its worker's
        tmp.replace(path)

    def peer_port(self, port: int | None) -> int | None:
        return None if port is None or port == 0 else port + self.index

    def peer_advertise(self, advertise: str | None) -> str | None:
        """IP:PORT -> IP:PORT+i (where the other replicas reach this worker's peer port)."""
        if advertise is None:
            return None
        host, sep, port = advertise.rpartition(":")
        if not sep or not port.isdigit():
            return advertise  # settings_from_env says what is wrong with it
        return f"{host}:{int(port) + self.index}"


def worker_slot() -> WorkerSlot | None:
    """This process's slot if a supervisor started it as a worker, else None."""
    index = os.environ.get(ENV_WORKER_INDEX)
    count = os.environ.get(ENV_WORKER_COUNT)
    if index is None or count is None:
        return None
    return WorkerSlot(int(index), int(count), os.environ.get(ENV_WORKER_DIR))


def merge_metrics(scrapes: Sequence[tuple[str, str]]) -> str:
    """Prometheus text from several processes as one exposition: each sample labelled
    worker="<name>", the samples of one metric family kept together under one HELP and TYPE
    (written by prometheus_client itself, so its naming rules hold)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for worker, text in scrapes:
        try:
            parsed = list(text_string_to_metric_families(text))
        except ValueError as err:  # not a worker's exposition: left out, not the others
            log.warning("worker %s's metrics are not Prometheus text (%s): left out", worker, err)
            continue
        for family in parsed:
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            merged.samples.extend(
                s._replace(labels={**s.labels, "worker": worker}) for s in family.samples
            )

    class _Merged:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry).decode()


def die_with_parent() -> None:
    """SIGTERM this process when its parent dies (Linux): run between fork and exec."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Worker:
    def __init__(self, index: int, argv: list[str], env: dict[str, str]) -> None:
        self.index = index
        self.argv = argv
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = RESTART_MIN_S
        self.restart_at: float | None = None
        self.served_once = False

    def start(self) -> None:
        # Started from the main thread only: PR_SET_PDEATHSIG fires when the thread that
        # started the child ends.
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            # A worker drains and stops if the supervisor dies without stopping it (SIGKILL):
            # no orphan keeps the port. Only a prctl() call between fork and exec.
            preexec_fn=die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )
        self.started = time.monotonic()
        self.restart_at = None
        log.info("worker %d started (pid %d)", self.index, self.proc.pid)


def supervise(
    argv: Sequence[str],
    count: int,
    host: str,
    metrics_port: int | None,
    stop_timeout: float,
) -> int:
    """Run `mlproxy <argv>` as `count` workers until SIGTERM or SIGINT; 0 if all ended well.

    `stop_timeout`: how long the workers get to drain after the signal before they are killed
    (their --grace and --drain-delay, and a margin)."""
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with tempfile.TemporaryDirectory(prefix="mlproxy-workers-") as directory:
        return _supervise(argv, count, host, metrics_port, stop_timeout, stopping, directory)


def _supervise(
    argv: Sequence[str],
    count: int,
    host: str,
    metrics_port: int | None,
    stop_timeout: float,
    stopping: threading.Event,
    directory: str,
) -> int:
    workers = []
    for i in range(count):
        env = {
            **os.environ,
            ENV_WORKER_INDEX: str(i),
            ENV_WORKER_COUNT: str(count),
            ENV_WORKER_DIR: directory,
        }
        workers.append(_Worker(i, [sys.executable, "-m", "mlproxy.cli", *argv], env))
    server = None
    if metrics_port is not None:
        server = _serve_metrics(host, metrics_port, workers, Path(directory))
        metrics_port = server.server_address[1]
    log.info(
        "supervising %d ext_proc workers%s",
        count,
        f"; their metrics on :{metrics_port}/metrics" if server is not None else "",
    )
    for w in workers:
        w.start()
    try:
        while not stopping.wait(0.2):
            _restart_exited(workers)
    finally:
        code = _stop(workers, stop_timeout)
        if server is not None:
            server.shutdown()
            server.server_close()
    return code


def _restart_exited(workers: list[_Worker]) -> None:
    now = time.monotonic()
    for w in workers:
        if w.proc is None:
            continue
        if w.restart_at is not None:
            if now >= w.restart_at:
                w.start()
            continue
        code = w.proc.poll()
        if code is None:
            continue
        if now - w.started >= STABLE_S:
            w.backoff = RESTART_MIN_S
        w.restart_at = now + w.backoff
        log.error(
            "worker %d (pid %d) exited with code %d; starting it again in %.0f s (its log above "
            "says why)",
            w.index,
            w.proc.pid,
            code,
            w.backoff,
        )
        w.backoff = min(RESTART_MAX_S, w.backoff * 2)


def _stop(workers: list[_Worker], timeout: float) -> int:
    running = [w for w in workers if w.proc is not None and w.proc.poll() is None]
    log.info("stopping %d workers (they drain for up to %.0f s)", len(running), timeout)
    for w in running:
        assert w.proc is not None
        w.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    code = 0
    for w in workers:
        if w.proc is None:
            continue
        if w.restart_at is not None:  # exited by itself and not started again
            code = 1
            continue
        try:
            result = w.proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker %d did not stop within %.0f s: killed", w.index, timeout)
            w.proc.kill()
            result = w.proc.wait()
        if result != 0:
            log.error("worker %d exited with code %d", w.index, result)
            code = 1
    return code


def _metrics_port(directory: Path, worker: _Worker) -> int | None:
    """The loopback port the worker's current process serves its metrics on, if it told us:
    a file left by a process that has exited (its port may now be anyone's) is not used."""
    proc = worker.proc
    if proc is None or proc.poll() is not None:
        return None
    try:
        pid, port = (
            int(x) for x in (directory / f"worker-{worker.index}.port").read_text().split()
        )
    except (OSError, ValueError):
        return None
    return port if pid == proc.pid and 0 < port < 65536 else None


def _serve_metrics(
    host: str, port: int, workers: list[_Worker], directory: Path
) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404)
                return
            scrapes = []
            for w in workers:
                port = _metrics_port(directory, w)
                if port is None:
                    if not w.served_once:
                        # Until every worker has served once, the pod is starting: 503 (a
                        # worker that restarts later is only left out of the scrapes it misses).
                        self.send_error(503, f"worker {w.index} is starting")
                        return
                    continue
                w.served_once = True
                try:
                    url = f"http://127.0.0.1:{port}/metrics"
                    with urllib.request.urlopen(url, timeout=SCRAPE_TIMEOUT_S) as resp:
                        text = resp.read(MAX_SCRAPE_BYTES + 1).decode()
                    if len(text) > MAX_SCRAPE_BYTES:
                        raise ValueError("scrape too large")
                except (OSError, ValueError) as err:
                    log.warning("worker %d's metrics were not read: %s", w.index, err)
                    continue
                scrapes.append((str(w.index), text))
            body = merge_metrics(scrapes).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
