"""ext_proc's heartbeat stats window (`--stats-window`, MLPROXY_STATS_WINDOW_S): what the fleet
tuner decides from. A replica started with a short window reports stats over that span, and a
policy's stats leave its heartbeat once its traffic is older than the window."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mlproxy.cli import main as cli_main
from mlproxy.client import Client
from mlproxy.demo import random_inputs
from mlproxy.stack import Stack
from tests.waiting import eventually

pytestmark = pytest.mark.e2e

WINDOW = 2.0  # seconds


@pytest.fixture(scope="module")
def short_window(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(
        envoy_port=0,
        run_dir=tmp_path_factory.mktemp("stats-window"),
        controlplane_env={"MLPROXY_TUNER_INTERVAL_S": "0"},  # nothing but the heartbeats
        extproc_env={"MLPROXY_STATS_WINDOW_S": f"{WINDOW:g}"},
    )
    with stack:
        yield stack


def demo_stats(api: Client) -> dict[str, Any] | None:
    [replica] = api.replicas()
    stats: dict[str, Any] | None = replica["stats"].get("demo")
    return stats


def predict(stack: Stack, x: list[float]) -> None:
    req = urllib.request.Request(
        f"{stack.envoy_url}/v1/models/demo:predict",
        data=json.dumps({"instances": [x]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200


def test_a_replica_reports_its_stats_over_the_window_it_was_given(short_window: Stack) -> None:
    api = Client(short_window.controlplane_url, short_window.admin_token)
    inputs = iter(random_inputs(1000))
    stats: dict[str, Any] | None = None

    def full_window() -> bool:
        """One more request (a client every 0.1 s); whether a heartbeat reports a full window."""
        nonlocal stats
        predict(short_window, next(inputs))
        stats = demo_stats(api)
        if stats is None:
            return False
        assert 0 < stats["window_s"] <= WINDOW, stats
        return bool(stats["window_s"] == WINDOW)

    # traffic until a heartbeat (every 2 s) reports a full window of it: 2 s, not more
    eventually(full_window, 10, lambda: f"a heartbeat with a full window ({stats})", interval=0.1)
    assert stats is not None and stats["requests"] >= 1 and stats["batches"] >= 1
    # then the traffic ages out of the window (the default, a minute, would keep it): within
    # the window and a heartbeat interval, with some slack for a loaded machine
    eventually(lambda: demo_stats(api) is None, WINDOW + 2 + 4, "the stats aged out", interval=0.1)
    assert [r["id"] for r in api.replicas()] == ["extproc-0"]  # still beating, without them


def run_extproc(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """An ext_proc that must refuse to start: exit code 2, its stderr."""
    policies = tmp_path / "p.yaml"
    policies.write_text("policies: []\n")
    proc = subprocess.run(
        [sys.executable, "-m", "mlproxy.cli", "extproc", "--policies", str(policies), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    return proc.stderr


@pytest.mark.parametrize("bad", ["0", "0.5", "nan", "inf", "3601", "a minute"])
def test_a_stats_window_out_of_range_is_refused_with_its_range(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli_main(["extproc", "--policies", "p.yaml", "--stats-window", bad])
    assert exit_.value.code == 2
    assert (
        f"--stats-window: not a number of seconds from 1 to 3600: {bad}" in capsys.readouterr().err
    )


@pytest.mark.parametrize("bad", ["0.5", "inf"])
def test_a_stats_window_out_of_range_in_the_environment_is_refused(
    tmp_path: Path, bad: str
) -> None:
    env = {**os.environ, "MLPROXY_STATS_WINDOW_S": bad}
    err = run_extproc(tmp_path, "--port", "0", env=env)
    expected = "MLPROXY_STATS_WINDOW_S: not a number of seconds from 1 to 3600"
    assert f"ext_proc cannot start: {expected}: {bad}" in err


@pytest.mark.parametrize("bad", ["0", "0.01", "nan", "inf", "61", "fast"])
def test_a_rate_window_out_of_range_is_refused_with_its_range(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli_main(["extproc", "--policies", "p.yaml", "--rate-window", bad])
    assert exit_.value.code == 2
    assert (
        f"--rate-window: not a number of seconds from 0.05 to 60: {bad}" in capsys.readouterr().err
    )


def test_a_rate_window_out_of_range_in_the_environment_is_refused(tmp_path: Path) -> None:
    env = {**os.environ, "MLPROXY_RATE_WINDOW_S": "0"}
    err = run_extproc(tmp_path, "--port", "0", env=env)
    expected = "MLPROXY_RATE_WINDOW_S: not a number of seconds from 0.05 to 60"
    assert f"ext_proc cannot start: {expected}: 0" in err
