"""Ports handed to children are reserved (mlproxy_common.ports): never the same one twice, in one
process or across processes, skipped when in use, free again when their holder dies."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlproxy.stack import Stack
from mlproxy_common import ports
from mlproxy_common.ports import PortAllocator, PortError, PortsExhausted

# A child that reserves N ports, prints them on one line and holds them until stdin closes.
HOLDER = """
import sys
from mlproxy_common import ports
print(*(ports.reserve() for _ in range(int(sys.argv[1]))), flush=True)
sys.stdin.read()
"""


def holder(n: int, lock_dir: Path, port_range: str | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "MLPROXY_PORT_LOCK_DIR": str(lock_dir)}
    if port_range is not None:
        env["MLPROXY_PORT_RANGE"] = port_range
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )


def held_by(proc: subprocess.Popen[str]) -> list[int]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"the holder exited with {proc.wait(60)} before printing its ports"
    return [int(p) for p in line.split()]


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(60)
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            pipe.close()


@pytest.fixture
def one_port() -> Iterator[int]:
    """A pool port no other allocator on this machine hands out meanwhile (reserved in the
    real lock file), for allocators on a private lock file whose range is just this port."""
    port = ports.reserve()
    yield port
    ports.release(port)


def test_a_process_never_gets_the_same_port_twice(tmp_path: Path) -> None:
    """The old way (bind port 0, close, return the number) repeats a port within a few hundred
    calls (the kernel reuses a released port); nothing is bound here between calls."""
    allocator = PortAllocator(lock_dir=tmp_path)
    got = [allocator.reserve() for _ in range(1000)]
    assert len(set(got)) == len(got)
    lo, hi = ports.ephemeral_range()
    assert not [p for p in got if lo <= p <= hi]  # outgoing connections cannot take them
    for p in got:
        allocator.release(p)


def test_processes_never_get_the_same_port(tmp_path: Path) -> None:
    """Two other processes and this one reserve at once, on one lock file: no port twice."""
    procs = [holder(300, tmp_path), holder(300, tmp_path)]
    try:
        mine = [PortAllocator(lock_dir=tmp_path).reserve() for _ in range(300)]
        theirs = [held_by(p) for p in procs]
        every = mine + theirs[0] + theirs[1]
        assert len(every) == 900
        assert len(set(every)) == 900, sorted(p for p in set(every) if every.count(p) > 1)
    finally:
        for p in procs:
            stop(p)


def test_a_port_is_free_again_when_its_holder_dies(tmp_path: Path, one_port: int) -> None:
    span = f"{one_port}-{one_port}"
    proc = holder(1, tmp_path, span)
    try:
        assert held_by(proc) == [one_port]
        mine = PortAllocator(lock_dir=tmp_path, wanted=(one_port, one_port))
        with pytest.raises(PortsExhausted, match="1 by other processes"):
            mine.reserve()
        proc.send_signal(signal.SIGKILL)  # no chance to release anything: the kernel does
        proc.wait(60)
        assert mine.reserve() == one_port
        mine.release(one_port)
    finally:
        stop(proc)


def test_exhaustion_is_a_clear_error_and_release_gives_the_port_back(
    tmp_path: Path, one_port: int
) -> None:
    allocator = PortAllocator(lock_dir=tmp_path, wanted=(one_port, one_port))
    assert allocator.reserve() == one_port
    with pytest.raises(PortsExhausted) as err:
        allocator.reserve()
    message = str(err.value)
    assert f"no free port in {one_port}-{one_port}" in message
    assert "1 reserved by this process" in message
    assert "MLPROXY_PORT_RANGE" in message
    # Another allocator in this process on the same file does not get it either.
    with pytest.raises(PortsExhausted):
        PortAllocator(lock_dir=tmp_path, wanted=(one_port, one_port)).reserve()
    allocator.release(one_port)
    assert allocator.reserve() == one_port
    allocator.release(one_port)


def test_a_port_in_use_is_skipped(tmp_path: Path, one_port: int) -> None:
    allocator = PortAllocator(lock_dir=tmp_path, wanted=(one_port, one_port))
    with socket.socket() as s:
        s.bind(("127.0.0.1", one_port))
        s.listen()
        with pytest.raises(PortsExhausted, match=r"1 in use on 127\.0\.0\.1"):
            allocator.reserve()
    assert allocator.reserve() == one_port
    allocator.release(one_port)


def test_a_range_inside_the_ephemeral_range_is_refused(tmp_path: Path) -> None:
    allocator = PortAllocator(lock_dir=tmp_path, wanted=(40000, 40010), ephemeral=(32768, 60999))
    with pytest.raises(PortError, match=r"ip_local_port_range.*MLPROXY_PORT_RANGE"):
        allocator.reserve()
    assert ports.pool_ports((20000, 20005), (20002, 20003)) == [20000, 20001, 20004, 20005]


@pytest.mark.parametrize("text", ["-", "20000", "a-b", "3000-2000", "80-90", "60000-70000"])
def test_a_bad_port_range_setting_is_a_clear_error(
    text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLPROXY_PORT_RANGE", text)
    with pytest.raises(ValueError, match="MLPROXY_PORT_RANGE="):
        PortAllocator(lock_dir=tmp_path).reserve()


def test_a_lock_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(PortError, match="MLPROXY_PORT_LOCK_DIR"):
        PortAllocator(lock_dir=shared).reserve()


def test_stacks_never_share_a_port(tmp_path: Path) -> None:
    """The bug this fixes: Redis and the demo model of one stack on one port. Every port of
    100 stacks, reserved but not yet bound (as between a stack's creation and its start)."""
    stacks = [Stack(replicas=2, envoy_port=0, run_dir=tmp_path) for _ in range(100)]
    try:
        every: list[int] = []
        for s in stacks:
            assert s.redis_port != s.model_port
            every += [s.model_port, s.admin_port, s.controlplane_port, s.redis_port, s.envoy_port]
            every += s.extproc_ports + s.metrics_ports
        assert len(every) == 900
        assert len(set(every)) == len(every)
    finally:
        for s in stacks:
            s.release_ports()
    assert not set(every) & ports.default_allocator().held()
