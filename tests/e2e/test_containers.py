"""The two images for real: built from this repository by Docker and run as the Kubernetes
manifests run them (manifests/base: read-only root filesystem, uid 10001, no capabilities, the
manifests' arguments and environment, secrets from files), with the real Envoy on the host in
front of three ext_proc containers.

Every container uses `--network host` and listens on loopback only, on ports from the tests'
reservation (mlproxy_common.ports), not the images' defaults; the HEALTHCHECK is then the
image's own command with the port moved, every second. Redis is a redis-server on the host,
with a password (the manifests' `MLPROXY_REDIS_PASSWORD_FILE`).

The base is tests/tools/prepare-docker's local stand-in for python:3.11-slim-bookworm (no
registry here): `bash tests/tools/prepare-docker` installs docker.io, starts dockerd and makes
it. Without Docker the tests skip, except under CI (CI=true), where they fail.

The image budgets (size, start-up to healthy, memory idle and under the demo's load) are printed
at the end of the module (`pytest -s` or the `-rA` summary) and written to the JSON file named
by MLPROXY_IMAGE_BUDGETS, if set.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlproxy.client import ApiError, Client
from mlproxy.demo import random_inputs
from mlproxy.envoy_config import local_config
from mlproxy.loadgen import Result, burst
from mlproxy.redis_server import redis_argv
from mlproxy.stack import Child, demo_policy, envoy_binary, http_ok, tcp_ok
from mlproxy_common import ports
from tests.waiting import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
PREPARE = ROOT / "tests" / "tools" / "prepare-docker"
HOW = f"bash {PREPARE.relative_to(ROOT)} (as root: docker.io, dockerd and a local base image)"
# The CA bundle pip trusts on this machine, passed to the build as the pip_cert secret (a
# TLS-inspecting proxy between the build and the index); in no layer of the images.
CA_BUNDLE = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
REPLICAS = 3
PREFIX = f"mlproxy-test-{os.getpid()}"
LABEL = "mlproxy-test=containers"
BUDGETS: dict[str, Any] = {}
MODEL = [sys.executable, "-m", "mlproxy.cli", "model"]
ENVOY_FLAGS = ["--log-level", "warn", "--disable-hot-restart", "--concurrency", "1"]


def unavailable(reason: str) -> None:
    """Skip, or under CI fail: CI must run these tests (.ci/run prepares Docker)."""
    if os.environ.get("CI"):
        pytest.fail(f"CI must run the image tests: {reason}; {HOW}")
    pytest.skip(f"{reason}: {HOW}")


def docker_cli() -> str:
    """Debian's docker.io client, which builds with BuildKit by itself (a newer client without
    the buildx plugin cannot), else the one on PATH."""
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and Path(candidate).exists():
            return candidate
    unavailable("no docker client")
    raise AssertionError  # unreachable


@dataclass
class Docker:
    cli: str

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        result = subprocess.run(
            [self.cli, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "DOCKER_BUILDKIT": "1"},
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"docker {shlex.join(args[:3])}... exited {result.returncode}:\n"
                f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            )
        return result.stdout

    def inspect(self, name: str) -> Any:
        return json.loads(self.run("inspect", name))[0]

    def health(self, name: str) -> str:
        state = self.inspect(name)["State"]
        return str(state.get("Health", {}).get("Status", "none"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep(d: Docker) -> list[str]:
    """Remove what an earlier run of these tests left when it was killed (SIGKILL, a cancelled
    job: no teardown ran): containers and images named mlproxy-test-<pid>-... whose test
    process is gone. A run still going (its pid alive) keeps its own. Red team 16: four
    healthy containers were left holding their loopback ports after pytest got SIGTERM."""
    gone = []
    dead = re.compile(r"mlproxy-test-(\d+)-")
    names = d.run("ps", "--all", "--filter", f"label={LABEL}", "--format", "{{.Names}}").split()
    for name in names:
        m = dead.match(name)
        if m and not _alive(int(m.group(1))):
            d.run("rm", "--force", name, check=False)
            gone.append(name)
    for ref in d.run("images", "--format", "{{.Repository}}:{{.Tag}}").split():
        m = dead.match(ref)
        if m and not _alive(int(m.group(1))):
            d.run("rmi", "--force", ref, check=False)
            gone.append(ref)
    return gone


@pytest.fixture(scope="session")
def docker() -> Docker:
    d = Docker(docker_cli())
    try:
        info = subprocess.run(
            [d.cli, "version", "--format", "{{.Server.Version}}"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        unavailable("the Docker daemon does not answer within 30 s")
    if info.returncode != 0:
        said = (info.stderr.strip().splitlines() or ["?"])[-1]
        unavailable(f"no Docker daemon answers ({said})")
    sweep(d)
    return d


@pytest.fixture(scope="session")
def base_image(docker: Docker) -> str:
    name = subprocess.run(
        ["bash", str(PREPARE), "base"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if docker.run("image", "inspect", name, check=False, timeout=30) == "":
        unavailable(f"no local base image {name}")
    return name


@pytest.fixture(scope="session")
def images(docker: Docker, base_image: str) -> Iterator[dict[str, str]]:
    """Both images built once for the session (BuildKit's cache makes a rebuild of unchanged
    sources take seconds); removed after, the build cache stays."""
    out: dict[str, str] = {}
    try:
        for name in ("extproc", "cp"):
            tag = f"{PREFIX}-{name}:test"
            start = time.monotonic()
            docker.run(
                "build",
                "--network",
                "host",
                "--progress",
                "plain",
                *(
                    ["--secret", f"id=pip_cert,src={CA_BUNDLE}"]
                    if Path(CA_BUNDLE).is_file()
                    else []
                ),
                "--build-arg",
                f"BASE_IMAGE={base_image}",
                "-f",
                str(ROOT / f"Dockerfile.{name}"),
                "-t",
                tag,
                str(ROOT),
                timeout=900,
            )
            BUDGETS[f"{name} build s"] = round(time.monotonic() - start, 1)
            BUDGETS[f"{name} image MB"] = round(int(docker.inspect(tag)["Size"]) / 1e6, 1)
            out[name] = tag
        BUDGETS["stand-in base MB"] = round(int(docker.inspect(base_image)["Size"]) / 1e6, 1)
        yield out
    finally:
        for tag in out.values():
            docker.run("rmi", "--force", tag, check=False)


@dataclass
class Fleet:
    """Redis, the demo model and Envoy on the host; the control plane and three ext_proc
    replicas in containers."""

    docker: Docker
    images: dict[str, str]
    run_dir: Path
    redis_port: int = field(default_factory=ports.reserve)
    model_port: int = field(default_factory=ports.reserve)
    cp_port: int = field(default_factory=ports.reserve)
    envoy_port: int = field(default_factory=ports.reserve)
    admin_port: int = field(default_factory=ports.reserve)
    grpc_ports: list[int] = field(default_factory=lambda: [ports.reserve() for _ in range(3)])
    metrics_ports: list[int] = field(default_factory=lambda: [ports.reserve() for _ in range(3)])
    peer_ports: list[int] = field(default_factory=lambda: [ports.reserve() for _ in range(3)])
    admin_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    children: list[Child] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)
    started: dict[str, float] = field(default_factory=dict)

    @property
    def envoy_url(self) -> str:
        return f"http://127.0.0.1:{self.envoy_port}"

    @property
    def model_url(self) -> str:
        return f"http://127.0.0.1:{self.model_port}"

    def api(self) -> Client:
        return Client(f"http://127.0.0.1:{self.cp_port}", self.admin_token)

    def secret(self, name: str, value: str) -> Path:
        """A secret file the containers' user can read (Kubernetes: 0440 with fsGroup)."""
        path = self.run_dir / "secrets" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(value + "\n")
        path.chmod(0o444)
        return path

    def start_child(self, child: Child) -> None:
        self.children.append(child)
        child.start()
        child.wait_ready(30)

    def container(
        self,
        name: str,
        image: str,
        health: str,
        env: dict[str, str],
        mounts: dict[Path, str],
        args: list[str],
    ) -> str:
        """`docker run` as the manifests' securityContext runs the container; the image's
        HEALTHCHECK command (`health`: its port moved) every second."""
        full = f"{PREFIX}-{name}"
        self.containers.append(full)
        self.started[full] = time.monotonic()
        self.docker.run(
            "run",
            "--detach",
            "--name",
            full,
            "--label",
            LABEL,
            "--network",
            "host",
            "--read-only",
            "--tmpfs",
            "/tmp:size=16m",
            "--user",
            "10001:10001",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            "--memory",
            "512m",
            "--health-cmd",
            health,
            "--health-interval",
            "1s",
            *(a for k, v in env.items() for a in ("--env", f"{k}={v}")),
            *(a for src, dst in mounts.items() for a in ("--volume", f"{src}:{dst}:ro")),
            image,
            *args,
        )
        return full

    def image_health(self, image: str, port: int) -> str:
        """The image's HEALTHCHECK command with its port replaced by `port`."""
        test = self.docker.inspect(image)["Config"]["Healthcheck"]["Test"]
        assert test[0] == "CMD", test
        return shlex.join(re.sub(r":\d+$", f":{port}", word) for word in test[1:])

    def start(self) -> None:
        password = secrets.token_urlsafe(24)
        redis_data = self.run_dir / "redis"
        redis_data.mkdir()
        self.start_child(
            Child(
                "redis",
                [
                    *redis_argv("127.0.0.1", self.redis_port, redis_data),
                    "--requirepass",
                    password,
                ],
                self.run_dir / "redis.log",
                ready=lambda: tcp_ok("127.0.0.1", self.redis_port),
            )
        )
        self.start_child(
            Child(
                "model",
                [*MODEL, "--host", "127.0.0.1", "--port", str(self.model_port)],
                self.run_dir / "model.log",
                ready=lambda: http_ok(f"{self.model_url}/healthz"),
            )
        )
        redis_env = {
            "MLPROXY_REDIS_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "MLPROXY_REDIS_PASSWORD_FILE": "/var/run/secrets/mlproxy-redis/password",
        }
        redis_secret = {
            self.secret("redis-password", password): redis_env["MLPROXY_REDIS_PASSWORD_FILE"]
        }
        # manifests/base/controlplane.yaml
        self.container(
            "cp",
            self.images["cp"],
            self.image_health(self.images["cp"], self.cp_port),
            {
                **redis_env,
                "MLPROXY_ADMIN_TOKENS_FILE": "/var/run/secrets/mlproxy/admin-tokens",
                "MLPROXY_READ_TOKENS_FILE": "/var/run/secrets/mlproxy/read-tokens",
                "MLPROXY_TUNER_INTERVAL_S": "5",
                "MLPROXY_TUNER_LEASE_S": "15",
                "MLPROXY_MAX_CONNECTIONS": "1000",
                "MLPROXY_HEADER_TIMEOUT_S": "10",
                "MLPROXY_BODY_TIMEOUT_S": "10",
            },
            {
                **redis_secret,
                self.secret(
                    "admin-tokens", self.admin_token
                ): "/var/run/secrets/mlproxy/admin-tokens",
                self.secret("read-tokens", secrets.token_urlsafe(24)): (
                    "/var/run/secrets/mlproxy/read-tokens"
                ),
            },
            ["--host", "127.0.0.1", "--port", str(self.cp_port)],
        )
        self.wait_healthy([f"{PREFIX}-cp"])
        assert http_ok(f"http://127.0.0.1:{self.cp_port}/readyz")
        self.api().put_policy("demo", demo_policy(self.model_url))
        # manifests/base/extproc.yaml, on loopback
        peer_token = self.secret("peer-token", secrets.token_urlsafe(24))
        for i in range(REPLICAS):
            port, peer = self.grpc_ports[i], self.peer_ports[i]
            self.container(
                f"extproc-{i}",
                self.images["extproc"],
                self.image_health(self.images["extproc"], port),
                {
                    **redis_env,
                    "MLPROXY_PEER_TOKEN_FILE": "/var/run/secrets/mlproxy-peer/token",
                    "MLPROXY_WORKERS": "1",
                },
                {**redis_secret, peer_token: "/var/run/secrets/mlproxy-peer/token"},
                [
                    "--host=127.0.0.1",
                    f"--port={port}",
                    f"--metrics-port={self.metrics_ports[i]}",
                    f"--replica-id={PREFIX}-extproc-{i}",
                    f"--advertise=127.0.0.1:{port}",
                    "--drain-delay=10",
                    "--grace=15",
                    f"--peer-port={peer}",
                    f"--peer-advertise=127.0.0.1:{peer}",
                    "--peer-networks=127.0.0.0/8",
                ],
            )
        config = local_config(
            listener_port=self.envoy_port,
            extproc=[("127.0.0.1", p) for p in self.grpc_ports],
            model_port=self.model_port,
            admin_port=self.admin_port,
        )
        config_path = self.run_dir / "envoy.yaml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.wait_healthy(self.containers[1:])
        self.start_child(
            Child(
                "envoy",
                [envoy_binary(), "-c", str(config_path), *ENVOY_FLAGS],
                self.run_dir / "envoy.log",
                ready=lambda: http_ok(f"{self.envoy_url}/healthz"),
            )
        )

    def wait_healthy(self, names: list[str]) -> None:
        """Until Docker calls every container healthy; the seconds from `docker run` to that
        go to the budgets (to within a health check interval, 1 s)."""
        waiting = set(names)

        def check() -> bool:
            for name in sorted(waiting):
                if self.docker.health(name) == "healthy":
                    waiting.discard(name)
                    BUDGETS[f"{name.removeprefix(PREFIX + '-')} start to healthy s"] = round(
                        time.monotonic() - self.started[name], 1
                    )
            return not waiting

        eventually(
            check,
            90,
            lambda: "healthy: " + "; ".join(f"{n}, log:\n{self.logs(n)}" for n in waiting),
            interval=0.2,
        )

    def logs(self, name: str) -> str:
        result = subprocess.run(
            [self.docker.cli, "logs", "--tail", "30", name],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return result.stdout + result.stderr

    def memory(self) -> dict[str, float]:
        """MiB each container uses now (docker stats)."""
        out = self.docker.run(
            "stats", "--no-stream", "--format", "{{.Name}} {{.MemUsage}}", *self.containers
        )
        found: dict[str, float] = {}
        units = {"B": 1 / 2**20, "KiB": 1 / 1024, "MiB": 1.0, "GiB": 1024.0}
        for line in out.splitlines():
            name, usage = line.split(" ", 1)
            m = re.match(r"([\d.]+)(\w+)", usage.strip())
            assert m, line
            found[name.removeprefix(PREFIX + "-")] = round(float(m.group(1)) * units[m.group(2)], 1)
        return found

    def stop(self) -> None:
        for name in self.containers:
            self.docker.run("rm", "--force", name, check=False, timeout=60)
        for child in reversed(self.children):
            child.stop()
        for port in (
            self.redis_port,
            self.model_port,
            self.cp_port,
            self.envoy_port,
            self.admin_port,
            *self.grpc_ports,
            *self.metrics_ports,
            *self.peer_ports,
        ):
            ports.release(port)


@pytest.fixture(scope="module")
def fleet(
    docker: Docker, images: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    f = Fleet(docker, images, tmp_path_factory.mktemp("containers"))
    try:
        f.start()
        BUDGETS["idle MiB"] = f.memory()
        yield f
    finally:
        f.stop()


def demo_bodies(n: int, seed: int = 1) -> list[bytes]:
    return [json.dumps({"instances": [x]}).encode() for x in random_inputs(n, seed=seed)]


def mismatches(fleet: Fleet, bodies: list[bytes], results: list[Result]) -> list[int]:
    """Requests whose answer through Envoy differs from the model's unbatched answer."""
    direct = asyncio.run(burst(f"{fleet.model_url}/v1/models/demo:predict", bodies, 4))
    return [
        r.index
        for r, d in zip(results, direct, strict=True)
        if r.status != 200 or d.status != 200 or json.loads(r.body) != json.loads(d.body)
    ]


def test_images_run_as_uid_10001_without_the_build_secret(
    docker: Docker, images: dict[str, str]
) -> None:
    for tag in images.values():
        config = docker.inspect(tag)["Config"]
        assert config["User"] == "10001:10001"
        # The pip_cert secret was mounted for the RUN step only: nowhere in the image.
        listing = docker.run(
            "run",
            "--rm",
            "--network",
            "host",
            "--entrypoint",
            "sh",
            tag,
            "-c",
            "id -u; ls -A /run/secrets 2>/dev/null; grep -rl PIP_CERT /opt/mlproxy/bin || true",
        )
        assert listing.split() == ["10001"], listing


def test_every_container_turns_healthy_and_answers_the_demo_correctly(fleet: Fleet) -> None:
    for name in fleet.containers:
        assert fleet.docker.health(name) == "healthy"
        state = fleet.docker.inspect(name)
        assert state["HostConfig"]["ReadonlyRootfs"] is True
        assert state["Config"]["User"] == "10001:10001"
    bodies = demo_bodies(1024)
    samples: list[dict[str, float]] = []
    sampler = threading.Thread(target=lambda: samples.append(fleet.memory()))
    results: list[Result] = []

    async def load() -> None:
        task = asyncio.create_task(burst(f"{fleet.envoy_url}/v1/models/demo:predict", bodies, 64))
        await asyncio.sleep(0.3)
        sampler.start()
        results.extend(await task)

    asyncio.run(load())
    sampler.join()
    BUDGETS["under demo load MiB"] = samples[0]
    assert not mismatches(fleet, bodies, results)
    # Every replica took part: Envoy spreads the streams over the three containers.
    for port in fleet.metrics_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        assert re.search(r'^mlproxy_requests_total\{[^}]*policy="demo"[^}]*\} [1-9]', text, re.M), (
            port
        )


def test_a_policy_change_reaches_all_three_containers(fleet: Fleet) -> None:
    api = fleet.api()
    body = demo_policy(fleet.model_url)
    body["batching"] = {**body["batching"], "max_batch_size": 8}  # type: ignore[dict-item]
    version = api.put_policy("demo", body)["version"]

    def converged() -> Any:
        try:
            status = api.status("demo")
        except ApiError:
            return False
        return status["version"] == version and status["complete"] and status["replicas"] == 3

    eventually(converged, 30, lambda: f"rollout of version {version}: {api.status('demo')}")
    bodies = demo_bodies(256, seed=2)
    results = asyncio.run(burst(f"{fleet.envoy_url}/v1/models/demo:predict", bodies, 32))
    assert not mismatches(fleet, bodies, results)
    assert max(r.batch_size for r in results) <= 8


def test_docker_stop_drains_a_replica_without_a_failed_request(fleet: Fleet) -> None:
    victim = fleet.containers[-1]
    bodies = demo_bodies(3000, seed=3)
    stopped: dict[str, Any] = {}

    def stop() -> None:
        # Kubernetes' terminationGracePeriodSeconds: 40
        start = time.monotonic()
        stopped["out"] = fleet.docker.run("stop", "--time", "40", victim, timeout=60)
        stopped["s"] = round(time.monotonic() - start, 1)

    results: list[Result] = []
    sent: list[bytes] = []

    async def load() -> None:
        # Requests all along the drain (--drain-delay=10, then the queues' flush), until the
        # container has exited.
        url = f"{fleet.envoy_url}/v1/models/demo:predict"
        results.extend(await burst(url, bodies[:200], 16))
        sent.extend(bodies[:200])
        stopper = threading.Thread(target=stop)
        stopper.start()
        while stopper.is_alive():
            chunk = bodies[len(sent) % 2800 :][:200]
            results.extend(await burst(url, chunk, 16))
            sent.extend(chunk)
        await asyncio.to_thread(stopper.join)

    asyncio.run(load())
    state = fleet.docker.inspect(victim)["State"]
    assert state["Running"] is False
    assert state["ExitCode"] == 0, fleet.logs(victim)
    failed = [r for r in results if r.status != 200]
    assert not failed, f"{len(failed)} failed, e.g. {failed[0]}"
    assert not mismatches(fleet, sent, results)
    BUDGETS["docker stop s"] = stopped["s"]


def test_image_budgets(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    """Not a check: prints what the module measured (and writes MLPROXY_IMAGE_BUDGETS)."""
    with capsys.disabled():
        print("\nimage budgets:", json.dumps(BUDGETS, indent=1))
    if os.environ.get("MLPROXY_IMAGE_BUDGETS"):
        Path(os.environ["MLPROXY_IMAGE_BUDGETS"]).write_text(json.dumps(BUDGETS, indent=1))


def test_what_a_killed_run_left_is_swept_and_a_live_runs_is_kept(
    docker: Docker, base_image: str
) -> None:
    done = subprocess.Popen(["true"])
    done.wait()  # a test process that is gone
    left = f"mlproxy-test-{done.pid}-planted"
    ours = f"{PREFIX}-planted"
    for name in (left, ours):
        docker.run("create", "--name", name, "--label", LABEL, base_image, "true")
    try:
        assert left in sweep(docker)
        names = docker.run("ps", "--all", "--format", "{{.Names}}").split()
        assert left not in names and ours in names
    finally:
        docker.run("rm", "--force", left, ours, check=False)
