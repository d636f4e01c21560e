"""Ports for child processes: reserved, never merely probed.

The old way (bind port 0, read the number, close the socket, hand the number to a child that
binds it later) is a race: between the close and the child's bind, the kernel hands the same
number to the next `bind(0)` (the next call of the same helper, often) or to an outgoing
connection, and two children of one stack ended up on one port (the control plane then spoke
HTTP to "Redis"). A port handed to a child process or written into a config file must stay
reserved until that child has bound it. `reserve()` does that in four layers:

1. **Outside the kernel's ephemeral range.** Ports come from a pool (default 20000-32767, or
   `MLPROXY_PORT_RANGE=lo-hi`) minus the range in /proc/sys/net/ipv4/ip_local_port_range, from
   which the kernel picks the local port of every outgoing connection and of every `bind(0)`.
   So no connection and no server that binds port 0 (the in-process test servers do) can ever
   take a reserved port, however long the child takes to start.
2. **A lock other processes see.** Each reserved port is an exclusive POSIX record lock on one
   byte (offset = port number) of a per-user lock file (`/tmp/mlproxy-ports-<uid>/ports.lock`,
   or `$MLPROXY_PORT_LOCK_DIR/ports.lock`). Another process running this allocator (a second
   test run, another `mlproxy up`, a benchmark) cannot lock the same byte, so it skips the
   port. The lock lasts until `release()` or the end of the process: when the process dies,
   however it dies, the kernel drops its locks, so nothing needs cleaning up and nothing goes
   stale. One file and one descriptor per process, whatever the number of ports (a lock file
   per port would cost a descriptor per port). Record locks are per process, so:
3. **An in-process set** keeps two callers in one process (threads, several allocators) apart,
   and
4. **a bind check** (without SO_REUSEADDR, so a port with a connection in TIME_WAIT is skipped
   too) skips ports something else holds right now: a service of the machine, or a child of a
   process that died while its child lived on.

What this does not cover: a program that binds a fixed port in the pool without asking (pick
`MLPROXY_PORT_RANGE` away from your services), and other users' allocators (the lock file is
per user; the bind check still skips their bound ports). When every port in the pool is taken,
`reserve()` raises `PortsExhausted` saying how many ports are locked, by whom, and what to do.

Only ports handed to another process or to a config file need this. A server in this process
that can bind port 0 itself and report the bound port should keep doing so.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import socket
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["PortAllocator", "PortError", "PortsExhausted", "release", "reserve"]

log = logging.getLogger(__name__)

DEFAULT_RANGE = (20000, 32767)
EPHEMERAL_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
# Where /proc is missing (not Linux): the IANA dynamic range, macOS's default.
FALLBACK_EPHEMERAL = (49152, 65535)


class PortError(RuntimeError):
    """No port can be reserved; the message says why and what to do."""


class PortsExhausted(PortError):
    """Every port of the pool is reserved or in use."""


def ephemeral_range(path: Path = EPHEMERAL_FILE) -> tuple[int, int]:
    """The kernel's range for local ports of outgoing connections and bind(0)."""
    try:
        lo, hi = (int(x) for x in path.read_text().split())
    except (OSError, ValueError):
        return FALLBACK_EPHEMERAL
    return lo, hi


def parse_range(text: str) -> tuple[int, int]:
    """'lo-hi' (inclusive) with 1024 <= lo <= hi <= 65535; ValueError otherwise."""
    try:
        lo_s, hi_s = text.split("-")
        lo, hi = int(lo_s), int(hi_s)
    except ValueError:
        raise ValueError(f"MLPROXY_PORT_RANGE={text!r}: expected lo-hi, e.g. 20000-32767") from None
    if not 1024 <= lo <= hi <= 65535:
        raise ValueError(f"MLPROXY_PORT_RANGE={text!r}: need 1024 <= lo <= hi <= 65535")
    return lo, hi


def pool_ports(wanted: tuple[int, int], ephemeral: tuple[int, int]) -> list[int]:
    """The ports of `wanted` outside `ephemeral` (both inclusive), in order."""
    return [p for p in range(wanted[0], wanted[1] + 1) if not ephemeral[0] <= p <= ephemeral[1]]


def default_lock_dir() -> Path:
    """Fixed per user (not $TMPDIR, which differs between shells), so every process of a user
    finds the same file."""
    env = os.environ.get("MLPROXY_PORT_LOCK_DIR")
    if env:
        return Path(env)
    return Path(f"/tmp/mlproxy-ports-{os.getuid()}")


def _open_lock_file(directory: Path) -> int:
    """The lock file's descriptor; the directory must be a real directory of this user that
    nobody else can write (another user could otherwise swap the file)."""
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise PortError(
            f"cannot create the port lock directory {directory}: {err}; "
            "set MLPROXY_PORT_LOCK_DIR to a directory of yours"
        ) from err
    st = directory.lstat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        raise PortError(
            f"the port lock directory {directory} is not a directory of this user that only "
            "this user can write; remove it or set MLPROXY_PORT_LOCK_DIR to another one"
        )
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    return os.open(directory / "ports.lock", flags, 0o600)


# Record locks belong to the process, and closing *any* descriptor of the file drops all of
# them: so one descriptor per lock file per process, never closed, and one set of the ports
# this process holds in it, shared by every allocator using that file.
_files: dict[Path, tuple[int, set[int]]] = {}
_files_lock = threading.Lock()


def _lock_file(directory: Path) -> tuple[int, set[int]]:
    key = directory.absolute()
    with _files_lock:
        if key not in _files:
            _files[key] = (_open_lock_file(key), set())
        return _files[key]


def bindable(host: str, port: int) -> bool:
    """Whether nothing holds host:port now, not even a connection in TIME_WAIT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


@dataclass
class PortAllocator:
    """Hands out ports no other caller of an allocator on the same lock file gets: in this
    process or another, until `release()` or this process ends."""

    lock_dir: Path = field(default_factory=default_lock_dir)
    wanted: tuple[int, int] | None = None  # None: MLPROXY_PORT_RANGE, else DEFAULT_RANGE
    ephemeral: tuple[int, int] | None = None  # None: the kernel's
    _next: int | None = None
    _mutex: threading.Lock = field(default_factory=threading.Lock)

    def _pool(self) -> tuple[tuple[int, int], tuple[int, int], list[int]]:
        env = os.environ.get("MLPROXY_PORT_RANGE")
        wanted = self.wanted or (parse_range(env) if env else DEFAULT_RANGE)
        ephemeral = self.ephemeral or ephemeral_range()
        pool = pool_ports(wanted, ephemeral)
        if not pool:
            raise PortError(
                f"the port range {wanted[0]}-{wanted[1]} lies inside the kernel's ephemeral "
                f"range {ephemeral[0]}-{ephemeral[1]} (net.ipv4.ip_local_port_range), where "
                "outgoing connections could take its ports; set MLPROXY_PORT_RANGE=lo-hi to "
                "a range outside it that no service of this machine uses"
            )
        return wanted, ephemeral, pool

    def reserve(self, host: str = "127.0.0.1") -> int:
        """A port of the pool that is free on `host` now and reserved for this process."""
        wanted, _, pool = self._pool()
        fd, held = _lock_file(self.lock_dir)
        with self._mutex:
            if self._next is None:
                # A random start spreads concurrent processes over the pool (fewer lock
                # attempts) and keeps a new run off the ports a run that just ended used.
                self._next = random.randrange(len(pool))
            locked = busy = 0
            for i in range(len(pool)):
                port = pool[(self._next + i) % len(pool)]
                with _files_lock:
                    if port in held:
                        continue
                    try:
                        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, port)
                    except OSError as err:
                        if err.errno not in (errno.EACCES, errno.EAGAIN):
                            raise
                        locked += 1
                        continue
                    if not bindable(host, port):
                        fcntl.lockf(fd, fcntl.LOCK_UN, 1, port)
                        busy += 1
                        continue
                    held.add(port)
                # Round robin: a port released here is not handed out again at once.
                self._next = (self._next + i + 1) % len(pool)
                return port
        raise PortsExhausted(
            f"no free port in {wanted[0]}-{wanted[1]} ({len(pool)} ports outside the "
            f"ephemeral range): {len(held)} reserved by this process, {locked} by other "
            f"processes (lock file {self.lock_dir / 'ports.lock'}), {busy} in use on {host}; "
            "stop other stacks or test runs, or set MLPROXY_PORT_RANGE=lo-hi to a larger range"
        )

    def release(self, port: int) -> None:
        """Let this or another process have `port` again (its child has exited)."""
        fd, held = _lock_file(self.lock_dir)
        with _files_lock:
            if port in held:
                held.discard(port)
                fcntl.lockf(fd, fcntl.LOCK_UN, 1, port)

    def held(self) -> set[int]:
        """The ports this process holds in this allocator's lock file."""
        _, held = _lock_file(self.lock_dir)
        with _files_lock:
            return set(held)


_default: PortAllocator | None = None


def default_allocator() -> PortAllocator:
    global _default  # noqa: PLW0603
    if _default is None:
        _default = PortAllocator()
    return _default


def reserve(host: str = "127.0.0.1") -> int:
    """A port for a child process or a config file, reserved until `release()` or the end of
    this process (see the module docstring)."""
    return default_allocator().reserve(host)


def release(port: int) -> None:
    default_allocator().release(port)
