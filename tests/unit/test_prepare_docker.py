"""`tests/tools/prepare-docker stop` stops only the dockerd it started for the same owner, and
only while that pid is still that dockerd (red team 16: it sent SIGTERM to whatever pid its
file named, so one CI run stopped another's daemon, and a reused pid was killed). Driven with
the script's state file moved to a temporary directory and stand-in processes."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PREPARE = ROOT / "tests" / "tools" / "prepare-docker"
SLEEP = shutil.which("sleep") or "/bin/sleep"


def started_at(pid: int) -> str:
    # field 22 of /proc/<pid>/stat (the name in field 2 holds no space here)
    return Path(f"/proc/{pid}/stat").read_text().split()[21]


def stop(state: Path, owner: str) -> str:
    env = {**os.environ, "MLPROXY_DOCKERD_STATE": str(state), "MLPROXY_DOCKER_OWNER": owner}
    result = subprocess.run(
        ["bash", str(PREPARE), "stop"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def process(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A stand-in named `dockerd` (a copy of sleep), as the script's check reads /proc."""
    fake = tmp_path / "dockerd"
    shutil.copy(SLEEP, fake)
    proc = subprocess.Popen([str(fake), "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_it_stops_the_dockerd_it_started_for_this_owner(
    tmp_path: Path, process: subprocess.Popen[bytes]
) -> None:
    state = tmp_path / "state"
    state.write_text(f"{process.pid} {started_at(process.pid)} ci-1\n")
    assert "dockerd stopped" in stop(state, "ci-1")
    assert process.wait(timeout=30) is not None
    assert not state.exists()


def test_another_owners_daemon_is_left_running(
    tmp_path: Path, process: subprocess.Popen[bytes]
) -> None:
    state = tmp_path / "state"
    state.write_text(f"{process.pid} {started_at(process.pid)} ci-1\n")
    assert "left running" in stop(state, "ci-2")
    assert process.poll() is None and state.exists()


def test_a_pid_that_is_no_longer_that_dockerd_is_not_killed(tmp_path: Path) -> None:
    state = tmp_path / "state"
    other = subprocess.Popen([SLEEP, "60"])  # not a dockerd: the pid was reused
    try:
        state.write_text(f"{other.pid} {started_at(other.pid)} manual\n")
        assert "nothing stopped" in stop(state, "manual")
        assert other.poll() is None
        fake = tmp_path / "dockerd"
        shutil.copy(SLEEP, fake)
        same_name = subprocess.Popen([str(fake), "60"])  # a dockerd, but started later
        try:
            state.write_text(f"{same_name.pid} 1 manual\n")
            assert "nothing stopped" in stop(state, "manual")
            assert same_name.poll() is None
        finally:
            same_name.kill()
            same_name.wait()
    finally:
        other.kill()
        other.wait()
