"""An open-loop HTTP/1.1 load generator: every request leaves at a time fixed in advance.

Requests are sent at their scheduled times whatever happened to the ones before (overload shows
as latency and errors, never as fewer requests: no coordinated omission), each on a keep-alive
connection that is free at that moment, or a new one. Latency is measured from the scheduled
time to the answer's last byte.

To keep its own timing error small on a busy 2-core machine it uses two threads and no event
loop: a sender that sleeps until each request's time (`time.sleep`, which sleeps on the
monotonic clock to within tens of microseconds) and writes the request with one blocking
`send`, and a reader that waits on every connection with a selector and parses the answers.
Each request's send-time error (when its bytes were handed to the kernel, minus when it was
due) is recorded, so a run shows whether the generator kept up.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import os
import queue
import selectors
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["OpenLoopResult", "replay", "subset"]

_NO_INDEX = -1
# Sleeps end up to ~0.1 ms late on a busy machine; the sender sleeps until this long before a
# request is due and spins for the rest (at 100 req/s, about 2% of a core).
_SPIN = 0.0002


def _prompt(priority: int) -> bool:
    """Ask Linux to run this thread on time: no timer slack (the default is 50 us) and, where
    allowed (root or CAP_SYS_NICE), a real-time priority, so that a busy CPU does not make it
    wait its turn. Both threads block almost all the time, so this takes little from the
    others; the reader gets it too, or it could be preempted while holding the GIL the sender
    needs. Whether the priority was granted."""
    if sys.platform != "linux":
        return False
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 ns
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))  # this thread only
    except (OSError, AttributeError):
        return False
    return True


@dataclass
class OpenLoopResult:
    started: float  # time.monotonic() of t = 0 of the schedule
    scheduled: np.ndarray  # seconds from `started`
    send_error: np.ndarray  # seconds the request left after its time (nan: never sent)
    latency: np.ndarray  # seconds from its time to the answer's last byte (nan: no answer)
    status: np.ndarray  # HTTP status; 0: no answer (connection refused, reset, or timeout)
    bodies: list[bytes]
    headers: list[dict[str, str]]  # lower-case names
    connections: int  # opened in all
    realtime: bool = False  # whether its threads ran at a real-time priority

    @property
    def lost(self) -> int:
        return int((self.status == 0).sum())

    def send_error_ms(self) -> dict[str, float]:
        err = self.send_error[np.isfinite(self.send_error)] * 1000
        if not err.size:
            return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
        return {
            "p50": float(np.percentile(err, 50)),
            "p99": float(np.percentile(err, 99)),
            "max": float(err.max()),
        }


class _Conn:
    __slots__ = ("buf", "closed", "index", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.index = _NO_INDEX  # the request waiting for its answer on this connection
        self.closed = False


def _parse(buf: bytearray) -> tuple[int, dict[str, str], bytes, int] | None:
    """One whole HTTP/1.1 response from the start of `buf`: (status, headers, body, bytes it
    used), or None if it has not all arrived. ValueError if it is not HTTP."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = head[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.x status line: {head[0]!r}")
    status = int(parts[1])
    headers: dict[str, str] = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    start = end + 4
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        pos = start
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            if size == 0:
                trailer_end = buf.find(b"\r\n\r\n", eol)
                if trailer_end < 0:
                    return None
                return status, headers, bytes(body), trailer_end + 4
            if len(buf) < eol + 2 + size + 2:
                return None
            body += buf[eol + 2 : eol + 2 + size]
            pos = eol + 2 + size + 2
    length = int(headers.get("content-length", "0"))
    if len(buf) < start + length:
        return None
    return status, headers, bytes(buf[start : start + length]), start + length


# Long: the sender, reader and timer of one trace share its state as closures.
def replay(  # noqa: PLR0912, PLR0915
    host: str,
    port: int,
    path: str | Callable[[int], str],
    times: Sequence[float],
    body_for: Callable[[int], bytes],
    timeout: float = 60.0,
    lead: float = 0.3,
    connections: int = 32,
    extra_headers: Sequence[tuple[str, str]] = (),
    progress: Callable[[float, int, int, int], None] | None = None,
    progress_every: float = 1.0,
) -> OpenLoopResult:
    """POST `body_for(i)` to `path` (or `path(i)`) at `times[i]` seconds (sorted) after a
    start `lead` seconds from now; wait for every answer (at most `timeout` each).
    `progress(elapsed, sent, answered, failed)` is called from this thread every
    `progress_every` seconds."""

    n = len(times)
    if any(b < a for a, b in itertools.pairwise(times)):
        raise ValueError("the schedule must be sorted")
    extra = "".join(f"{k}: {v}\r\n" for k, v in extra_headers)
    sent_at = np.full(n, np.nan)
    done_at = np.full(n, np.nan)
    status = np.zeros(n, dtype=np.int32)
    bodies: list[bytes] = [b""] * n
    headers: list[dict[str, str]] = [{} for _ in range(n)]
    idle: deque[_Conn] = deque()
    fresh: queue.SimpleQueue[_Conn] = queue.SimpleQueue()
    opened = 0
    answered = 0
    failed = 0
    sending_done = threading.Event()
    stop_reader = threading.Event()
    stop_sender = threading.Event()
    # Guards which request a connection carries (the sender hands a connection a request while
    # the reader may be closing it) and each request's outcome (counted once).
    lock = threading.RLock()
    realtime: list[bool] = []
    errors: list[BaseException] = []

    def connect() -> _Conn:
        nonlocal opened
        sock = socket.create_connection((host, port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        opened += 1
        return _Conn(sock)

    try:  # a warm pool, so that the first requests need not connect
        for _ in range(connections):
            idle.append(connect())
    except OSError:
        for conn in idle:
            conn.sock.close()
        raise
    sel = selectors.DefaultSelector()
    wake_r, wake_w = os.pipe()
    sel.register(wake_r, selectors.EVENT_READ, None)
    for conn in idle:
        sel.register(conn.sock, selectors.EVENT_READ, conn)

    start = time.monotonic() + lead

    def fail(i: int, at: float) -> None:
        nonlocal failed
        with lock:
            if np.isnan(done_at[i]):  # both threads may see the same connection fail
                status[i] = 0
                done_at[i] = at
                failed += 1

    pipe_open = [True]

    def wake() -> None:
        """Wake the reader (new connections to watch, or sending is over)."""
        with lock:
            if pipe_open[0]:
                os.write(wake_w, b"x")

    def sender() -> None:
        try:
            send_all()
        except BaseException as err:  # reported by the caller's thread
            errors.append(err)
        finally:
            sending_done.set()
            wake()

    def take(i: int) -> _Conn | None:
        """An idle connection now carrying request i, if there is one still open."""
        while True:
            try:
                conn = idle.popleft()
            except IndexError:
                return None
            with lock:
                if not conn.closed:  # the server may have closed it while it was idle
                    conn.index = i
                    return conn

    def send_all() -> None:
        realtime.append(_prompt(10))
        for i, t in enumerate(times):
            if stop_sender.is_set():
                return
            raw = body_for(i)
            request = (
                f"POST {path if isinstance(path, str) else path(i)} HTTP/1.1\r\n"
                f"Host: {host}:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n{extra}\r\n"
            ).encode() + raw
            due = start + t
            while (wait := due - time.monotonic()) > _SPIN:
                if stop_sender.wait(wait - _SPIN):
                    return
            while time.monotonic() < due:  # the last fraction of a millisecond: spin
                pass
            conn = take(i)
            new = conn is None
            if conn is None:
                try:
                    conn = connect()
                except OSError:
                    fail(i, time.monotonic())
                    continue
                conn.index = i
            try:
                conn.sock.sendall(request)
            except OSError:
                with lock:
                    if conn.index == i:
                        conn.index = _NO_INDEX
                fail(i, time.monotonic())
                if new:
                    conn.sock.close()
                continue  # the reader sees the broken connection and drops it
            sent_at[i] = time.monotonic()
            if new:
                fresh.put(conn)
                wake()

    def drop(conn: _Conn, now: float) -> None:
        with lock:
            conn.closed = True
            i, conn.index = conn.index, _NO_INDEX
        if i != _NO_INDEX:
            fail(i, now)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(conn.sock)
        conn.sock.close()

    # Long: reads every answer of the trace and sorts it into the run's tallies.
    def reader() -> None:  # noqa: PLR0912, PLR0915
        nonlocal answered
        realtime.append(_prompt(5))
        live: set[_Conn] = set(idle)
        last_sweep = time.monotonic()
        while not stop_reader.is_set():
            for key, _ in sel.select(timeout=0.05):
                if key.data is None:
                    os.read(wake_r, 4096)
                    while True:
                        try:
                            conn = fresh.get_nowait()
                        except queue.Empty:
                            break
                        sel.register(conn.sock, selectors.EVENT_READ, conn)
                        live.add(conn)
                    continue
                conn = key.data
                try:
                    data = conn.sock.recv(1 << 16)
                except OSError:
                    data = b""
                now = time.monotonic()
                if not data:
                    live.discard(conn)
                    drop(conn, now)
                    continue
                conn.buf += data
                try:
                    parsed = _parse(conn.buf)
                except ValueError:
                    live.discard(conn)
                    drop(conn, now)
                    continue
                if parsed is None:
                    continue
                code, head, body, used = parsed
                del conn.buf[:used]
                with lock:
                    i, conn.index = conn.index, _NO_INDEX
                    if i != _NO_INDEX and np.isnan(done_at[i]):
                        status[i], headers[i], bodies[i], done_at[i] = code, head, body, now
                        answered += 1
                if i == _NO_INDEX:  # an answer nobody asked for on this connection
                    live.discard(conn)
                    drop(conn, now)
                    continue
                if head.get("connection", "").lower() == "close" or conn.buf:
                    live.discard(conn)
                    drop(conn, now)
                else:
                    idle.append(conn)
            now = time.monotonic()
            if now - last_sweep > 0.25:
                last_sweep = now
                for conn in list(live):
                    i = conn.index
                    if i != _NO_INDEX and now - (start + times[i]) > timeout:
                        live.discard(conn)
                        drop(conn, now)

    switch = sys.getswitchinterval()
    collecting = gc.isenabled()
    send_thread = threading.Thread(target=sender, name="openloop-sender", daemon=True)
    read_thread = threading.Thread(target=reader, name="openloop-reader", daemon=True)
    # the last request's answer is due by then, whatever happened to it
    give_up = start + (times[-1] if n else 0.0) + timeout + 5.0
    try:
        sys.setswitchinterval(0.0002)  # hand the GIL over quickly between sender and reader
        # A full garbage collection holds the GIL for milliseconds, whichever thread triggers
        # it; nothing here makes reference cycles, so collect after the run instead.
        gc.disable()
        read_thread.start()
        send_thread.start()
        next_report = start + progress_every
        while True:
            if errors:
                break
            if sending_done.is_set() and answered + failed >= n:
                break
            if time.monotonic() > give_up:  # a bug, not a slow server: fail what is left
                for i in range(n):
                    fail(i, time.monotonic())  # no-op for requests already counted
                break
            time.sleep(0.02)
            if progress is not None and time.monotonic() >= next_report:
                next_report += progress_every
                progress(
                    time.monotonic() - start, int(np.isfinite(sent_at).sum()), answered, failed
                )
    finally:
        stop_sender.set()
        stop_reader.set()
        if send_thread.is_alive():
            send_thread.join(timeout + 5)
        if read_thread.is_alive():
            read_thread.join(5)
        sys.setswitchinterval(switch)
        if collecting:
            gc.enable()
        for key in list(sel.get_map().values()):
            if isinstance(key.data, _Conn):
                key.data.sock.close()
        sel.close()
        with lock:
            pipe_open[0] = False
            os.close(wake_r)
            os.close(wake_w)
    if errors:
        raise errors[0]
    scheduled = np.asarray(times, dtype=float)
    return OpenLoopResult(
        started=start,
        scheduled=scheduled,
        send_error=sent_at - (start + scheduled),
        latency=np.where(status > 0, done_at - (start + scheduled), np.nan),
        status=status,
        bodies=bodies,
        headers=headers,
        connections=opened,
        realtime=all(realtime),
    )


def subset(result: OpenLoopResult, indices: np.ndarray) -> OpenLoopResult:
    """The requests at `indices` (e.g. one of several interleaved workloads), in that order."""
    return OpenLoopResult(
        started=result.started,
        scheduled=result.scheduled[indices],
        send_error=result.send_error[indices],
        latency=result.latency[indices],
        status=result.status[indices],
        bodies=[result.bodies[i] for i in indices],
        headers=[result.headers[i] for i in indices],
        connections=result.connections,
        realtime=result.realtime,
    )
