"""Envoy configs validated by the real Envoy; `mlproxy up` starts and stops cleanly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlproxy.envoy_config import local_config
from mlproxy.stack import envoy_binary, pid_alive, port_free
from mlproxy_common import ports
from tests.waiting import eventually

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def envoy_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("path", sorted((ROOT / "envoy").glob("*.yaml")), ids=lambda p: p.name)
def test_every_envoy_config_in_the_repo_is_valid(path: Path) -> None:
    result = envoy_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_generated_config_is_valid_and_local_yaml_is_its_default(tmp_path: Path) -> None:
    assert yaml.safe_load((ROOT / "envoy" / "local.yaml").read_text()) == local_config()
    cfg = tmp_path / "multi.yaml"
    cfg.write_text(
        yaml.safe_dump(
            local_config(extproc=[("127.0.0.1", 1), ("127.0.0.1", 2)], bypass_prefix="/direct/")
        )
    )
    result = envoy_validate(cfg)
    assert result.returncode == 0, result.stdout + result.stderr


def test_validation_catches_a_broken_config(tmp_path: Path) -> None:
    broken = local_config()
    broken["static_resources"]["clusters"][0]["lb_policy"] = "NOT_A_POLICY"
    cfg = tmp_path / "broken.yaml"
    cfg.write_text(yaml.safe_dump(broken))
    assert envoy_validate(cfg).returncode != 0


def children_of(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return sorted(kids)


def up_argv(port: int, *args: str, run_dir: Path) -> list[str]:
    """`mlproxy up` with its logs, configs and secrets in `run_dir` (a test's own: `up` keeps
    its run directory after it stops, for the operator)."""
    up = [sys.executable, "-m", "mlproxy.cli", "up", "--port", str(port), "--run-dir"]
    return [*up, str(run_dir), *args]


@contextlib.contextmanager
def running_up(
    port: int, *args: str, expected_children: int = 5, run_dir: Path | None = None
) -> Iterator[tuple[subprocess.Popen[str], list[int]]]:
    """`mlproxy up` as a subprocess, ready; yields it and its children. Without `args`, the
    control plane and the model go on free ports; without `run_dir`, a temporary one."""
    args = args or (
        "--controlplane-port",
        str(ports.reserve()),
        "--model-port",
        str(ports.reserve()),
    )
    with contextlib.ExitStack() as held:
        if run_dir is None:
            run_dir = Path(held.enter_context(tempfile.TemporaryDirectory(prefix="up-")))
        argv = up_argv(port, *args, run_dir=run_dir)
        proc = held.enter_context(
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
        try:
            yield proc, _wait_ready(proc, port, expected_children)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(30)  # before its run directory goes


def _wait_ready(proc: subprocess.Popen[str], port: int, expected_children: int = 5) -> list[int]:
    assert proc.stdout is not None
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            break
        if not line and proc.poll() is not None:
            break
    else:
        proc.kill()
    assert "Ctrl-C stops everything" in "".join(lines), "".join(lines)
    assert f"127.0.0.1:{port}" in "".join(lines)
    kids = children_of(proc.pid)
    assert len(kids) == expected_children  # model, redis, control plane, ext_proc, envoy
    return kids


def assert_batched_demo_answer(port: int) -> None:
    """One demo request through Envoy on `port` is answered by MLProxy (a batch of 1)."""
    body = b'{"instances": [[' + b",".join([b"0.5"] * 16) + b"]]}"
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/models/demo:predict",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["x-mlproxy-batch-size"] == "1"


def test_up_serves_and_ctrl_c_stops_every_child(tmp_path: Path) -> None:
    port = ports.reserve()
    run_dir = tmp_path / "run" / "up"  # --run-dir: made if missing, owner-only
    with running_up(port, run_dir=run_dir) as (proc, kids):
        assert failure_mode_allow(envoy_config_of(kids)) is False  # fail closed by default
        assert_batched_demo_answer(port)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    assert not [k for k in kids if pid_alive(k)]
    # its logs and configs stay there for the operator
    assert {"envoy.yaml", "envoy.log", "extproc-0.log"} <= {p.name for p in run_dir.iterdir()}
    assert run_dir.stat().st_mode & 0o777 == 0o700


def test_up_stops_everything_when_a_child_dies() -> None:
    with running_up(ports.reserve()) as (proc, kids):
        (extproc,) = [
            k for k in kids if b"\x00extproc\x00" in Path(f"/proc/{k}/cmdline").read_bytes()
        ]
        os.kill(extproc, signal.SIGKILL)
        assert proc.wait(30) == 1
        assert proc.stdout is not None
        assert "extproc-0 exited" in proc.stdout.read()
    # a moment for the stopped children to be reaped (up stopped them before it exited: a
    # wait on them being gone would also pass if PR_SET_PDEATHSIG killed them later)
    time.sleep(0.2)
    assert not [k for k in kids if pid_alive(k)]


def test_children_die_with_a_killed_supervisor() -> None:
    with running_up(ports.reserve()) as (proc, kids):
        proc.kill()  # no chance to clean up: PR_SET_PDEATHSIG must do it
        proc.wait(10)
    eventually(
        lambda: not [k for k in kids if pid_alive(k)],
        20,
        lambda: f"every child gone (alive: {[k for k in kids if pid_alive(k)]})",
        interval=0.1,
    )


def test_up_with_the_example_policy_file_batches_the_demo_model(tmp_path: Path) -> None:
    """docs/quickstart.md's `mlproxy up --policies examples/policies.yaml`: the example's
    backend is the demo model on its default port."""
    port = ports.reserve()
    example = ("--policies", str(ROOT / "examples" / "policies.yaml"))
    if not port_free("127.0.0.1", 8001):  # taken on this machine: `up` must say so, start nothing
        argv = up_argv(port, *example, run_dir=tmp_path / "up")
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 1
        assert "demo model port 127.0.0.1:8001 is in use" in result.stderr + result.stdout
        return
    # model, ext_proc, envoy: no Redis nor control plane with a policy file
    with running_up(port, *example, expected_children=3, run_dir=tmp_path / "up") as (proc, _):
        assert_batched_demo_answer(port)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0


def envoy_config_of(kids: list[int]) -> dict[str, Any]:
    """The config file the running Envoy among `kids` was started with."""
    for kid in kids:
        argv = Path(f"/proc/{kid}/cmdline").read_bytes().decode().split("\x00")
        if Path(argv[0]).name == "envoy":
            config: dict[str, Any] = yaml.safe_load(Path(argv[argv.index("-c") + 1]).read_text())
            return config
    raise AssertionError("no Envoy among the children")


def failure_mode_allow(config: dict[str, Any]) -> bool:
    (chain,) = config["static_resources"]["listeners"][0]["filter_chains"]
    http = chain["filters"][0]["typed_config"]
    (ext_proc,) = [f for f in http["http_filters"] if f["name"] == "envoy.filters.http.ext_proc"]
    return bool(ext_proc["typed_config"]["failure_mode_allow"])


def test_up_fail_open_runs_envoy_with_failure_mode_allow() -> None:
    """`mlproxy up --fail-open`: Envoy's ext_proc filter gets failure_mode_allow (what that does
    is tested in test_failure_mode.py); requests are batched as usual while ext_proc is up."""
    port = ports.reserve()
    args = ("--controlplane-port", str(ports.reserve()), "--model-port", str(ports.reserve()))
    with running_up(port, *args, "--fail-open") as (proc, kids):
        assert failure_mode_allow(envoy_config_of(kids)) is True
        assert_batched_demo_answer(port)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
