"""A stack's run directory: one it made for itself is gone if it started nothing (it held no
log, only configs and secrets made for children that never ran); one it was given is kept."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlproxy import stack as stack_module
from mlproxy.stack import Stack, StackError
from mlproxy_common import ports


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A reserved port with a listener on it: a stack told to use it fails before any child."""
    port = ports.reserve()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        yield port
    ports.release(port)


def _policies(tmp_path: Path) -> Path:
    path = tmp_path / "policies.json"
    path.write_text("[]")
    return path


def test_a_stack_that_started_nothing_leaves_no_run_directory_of_its_own(
    tmp_path: Path, taken_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    stack = Stack(envoy_port=taken_port, policies_file=_policies(tmp_path))
    try:
        assert stack.run_dir is not None and stack.run_dir.parent == temp
        with pytest.raises(StackError, match=str(taken_port)):
            stack.start()
        assert list(temp.iterdir()) == []  # its secrets and configs went with it
    finally:
        stack.stop()
        stack.release_ports()


def test_a_run_directory_the_operator_gave_is_kept(tmp_path: Path, taken_port: int) -> None:
    run_dir = tmp_path / "run"
    stack = Stack(envoy_port=taken_port, policies_file=_policies(tmp_path), run_dir=run_dir)
    try:
        with pytest.raises(StackError, match=str(taken_port)):
            stack.start()
        assert run_dir.is_dir()
    finally:
        stack.stop()
        stack.release_ports()


def test_the_demo_takes_a_run_directory(tmp_path: Path, taken_port: int) -> None:
    """`mlproxy demo --run-dir DIR`, as `up --run-dir`: here it cannot start (its port is
    taken), says why, and the directory it was given stays."""
    run_dir = tmp_path / "run"
    argv = ["demo", "--port", str(taken_port), "--run-dir", str(run_dir)]
    result = subprocess.run(
        [sys.executable, "-m", "mlproxy.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert str(taken_port) in result.stderr
    assert run_dir.is_dir()


def test_any_failure_before_a_child_removes_the_run_directory_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only a StackError: an OSError while making the secrets, say (red team 28)."""
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    def broken(*_: object, **__: object) -> None:
        raise OSError("disk full (test)")

    monkeypatch.setattr(stack_module.StackSecrets, "create", broken)
    stack = Stack(envoy_port=0, policies_file=_policies(tmp_path))
    try:
        with pytest.raises(OSError, match="disk full"):
            stack.start()
        assert list(temp.iterdir()) == []
    finally:
        stack.stop()
        stack.release_ports()
