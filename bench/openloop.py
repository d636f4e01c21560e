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


def replay(
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
    if any(b < a for a, b in itertools.pairwise(times)):
        raise ValueError("the schedule must be sorted")
    run = _Replay(host, port, path, times, body_for, timeout, connections, extra_headers)
    return run.run(lead, progress, progress_every)


class _Replay:
    """One replay: its connections and tallies, shared by three threads. The sender
    (`send_all`) writes each request at its time, the reader (`read_all`) sorts the answers
    into the tallies, and the caller's thread (`wait`) reports progress until every request is
    answered or failed. `lock` guards which request a connection carries (the sender hands a
    connection a request while the reader may be closing it) and each request's outcome
    (counted once)."""

    def __init__(
        self,
        host: str,
        port: int,
        path: str | Callable[[int], str],
        times: Sequence[float],
        body_for: Callable[[int], bytes],
        timeout: float,
        connections: int,
        extra_headers: Sequence[tuple[str, str]],
    ) -> None:
        n = len(times)
        self.host, self.port, self.path, self.times = host, port, path, times
        self.body_for, self.timeout = body_for, timeout
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in extra_headers)
        self.sent_at = np.full(n, np.nan)
        self.done_at = np.full(n, np.nan)
        self.status = np.zeros(n, dtype=np.int32)
        self.bodies: list[bytes] = [b""] * n
        self.headers: list[dict[str, str]] = [{} for _ in range(n)]
        self.idle: deque[_Conn] = deque()
        self.fresh: queue.SimpleQueue[_Conn] = queue.SimpleQueue()
        self.opened = 0
        self.answered = 0
        self.failed = 0
        self.sending_done = threading.Event()
        self.stop_reader = threading.Event()
        self.stop_sender = threading.Event()
        self.lock = threading.RLock()
        self.realtime: list[bool] = []
        self.errors: list[BaseException] = []
        try:  # a warm pool, so that the first requests need not connect
            for _ in range(connections):
                self.idle.append(self.connect())
        except OSError:
            for conn in self.idle:
                conn.sock.close()
            raise
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        self.pipe_open = True
        self.sel.register(self.wake_r, selectors.EVENT_READ, None)
        for conn in self.idle:
            self.sel.register(conn.sock, selectors.EVENT_READ, conn)
        self.start = 0.0  # time.monotonic() of t = 0 of the schedule, set by `run`

    def connect(self) -> _Conn:
        sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.opened += 1
        return _Conn(sock)

    def run(
        self,
        lead: float,
        progress: Callable[[float, int, int, int], None] | None,
        progress_every: float,
    ) -> OpenLoopResult:
        """Starts the schedule `lead` seconds from now; the result once it is over."""
        self.start = time.monotonic() + lead
        switch = sys.getswitchinterval()
        collecting = gc.isenabled()
        send_thread = threading.Thread(target=self.sender, name="openloop-sender", daemon=True)
        read_thread = threading.Thread(target=self.read_all, name="openloop-reader", daemon=True)
        try:
            sys.setswitchinterval(0.0002)  # hand the GIL over quickly between sender and reader
            # A full garbage collection holds the GIL for milliseconds, whichever thread
            # triggers it; nothing here makes reference cycles, so collect after the run.
            gc.disable()
            read_thread.start()
            send_thread.start()
            self.wait(progress, progress_every)
        finally:
            self.stop_sender.set()
            self.stop_reader.set()
            if send_thread.is_alive():
                send_thread.join(self.timeout + 5)
            if read_thread.is_alive():
                read_thread.join(5)
            sys.setswitchinterval(switch)
            if collecting:
                gc.enable()
            self.close()
        if self.errors:
            raise self.errors[0]
        return self.result()

    def wait(
        self, progress: Callable[[float, int, int, int], None] | None, progress_every: float
    ) -> None:
        """Until every request is answered or failed, or a thread failed."""
        n = len(self.times)
        # the last request's answer is due by then, whatever happened to it
        give_up = self.start + (self.times[-1] if n else 0.0) + self.timeout + 5.0
        next_report = self.start + progress_every
        while not self.errors:
            if self.sending_done.is_set() and self.answered + self.failed >= n:
                return
            if time.monotonic() > give_up:  # a bug, not a slow server: fail what is left
                for i in range(n):
                    self.fail(i, time.monotonic())  # no-op for requests already counted
                return
            time.sleep(0.02)
            if progress is not None and time.monotonic() >= next_report:
                next_report += progress_every
                sent = int(np.isfinite(self.sent_at).sum())
                progress(time.monotonic() - self.start, sent, self.answered, self.failed)

    def close(self) -> None:
        for key in list(self.sel.get_map().values()):
            if isinstance(key.data, _Conn):
                key.data.sock.close()
        self.sel.close()
        with self.lock:
            self.pipe_open = False
            os.close(self.wake_r)
            os.close(self.wake_w)

    def result(self) -> OpenLoopResult:
        scheduled = np.asarray(self.times, dtype=float)
        due = self.start + scheduled
        return OpenLoopResult(
            started=self.start,
            scheduled=scheduled,
            send_error=self.sent_at - due,
            latency=np.where(self.status > 0, self.done_at - due, np.nan),
            status=self.status,
            bodies=self.bodies,
            headers=self.headers,
            connections=self.opened,
            realtime=all(self.realtime),
        )

    def fail(self, i: int, at: float) -> None:
        with self.lock:
            if np.isnan(self.done_at[i]):  # both threads may see the same connection fail
                self.status[i] = 0
                self.done_at[i] = at
                self.failed += 1

    def wake(self) -> None:
        """Wake the reader (new connections to watch, or sending is over)."""
        with self.lock:
            if self.pipe_open:
                os.write(self.wake_w, b"x")

    # The sender's thread.

    def sender(self) -> None:
        try:
            self.send_all()
        except BaseException as err:  # reported by the caller's thread
            self.errors.append(err)
        finally:
            self.sending_done.set()
            self.wake()

    def send_all(self) -> None:
        self.realtime.append(_prompt(10))
        stop, start = self.stop_sender, self.start
        for i, t in enumerate(self.times):
            if stop.is_set():
                return
            request = self.request(i)
            due = start + t
            while (wait := due - time.monotonic()) > _SPIN:
                if stop.wait(wait - _SPIN):
                    return
            while time.monotonic() < due:  # the last fraction of a millisecond: spin
                pass
            self.send(i, request)

    def request(self, i: int) -> bytes:
        raw = self.body_for(i)
        return (
            f"POST {self.path if isinstance(self.path, str) else self.path(i)} HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n{self.extra}\r\n"
        ).encode() + raw

    def send(self, i: int, request: bytes) -> None:
        """Request i on an idle connection, or a new one."""
        conn = self.take(i)
        new = conn is None
        if conn is None:
            try:
                conn = self.connect()
            except OSError:
                self.fail(i, time.monotonic())
                return
            conn.index = i
        try:
            conn.sock.sendall(request)
        except OSError:
            with self.lock:
                if conn.index == i:
                    conn.index = _NO_INDEX
            self.fail(i, time.monotonic())
            if new:
                conn.sock.close()
            return  # the reader sees the broken connection and drops it
        self.sent_at[i] = time.monotonic()
        if new:
            self.fresh.put(conn)
            self.wake()

    def take(self, i: int) -> _Conn | None:
        """An idle connection now carrying request i, if there is one still open."""
        while True:
            try:
                conn = self.idle.popleft()
            except IndexError:
                return None
            with self.lock:
                if not conn.closed:  # the server may have closed it while it was idle
                    conn.index = i
                    return conn

    # The reader's thread.

    def read_all(self) -> None:
        """Reads every answer of the trace and sorts it into the run's tallies."""
        self.realtime.append(_prompt(5))
        live: set[_Conn] = set(self.idle)
        last_sweep = time.monotonic()
        while not self.stop_reader.is_set():
            for key, _ in self.sel.select(timeout=0.05):
                if key.data is None:
                    self.watch_fresh(live)
                elif not self.read(key.data):
                    live.discard(key.data)
            now = time.monotonic()
            if now - last_sweep > 0.25:
                last_sweep = now
                self.sweep(live, now)

    def watch_fresh(self, live: set[_Conn]) -> None:
        """The sender woke the reader: watch the connections it opened."""
        os.read(self.wake_r, 4096)
        while True:
            try:
                conn = self.fresh.get_nowait()
            except queue.Empty:
                return
            self.sel.register(conn.sock, selectors.EVENT_READ, conn)
            live.add(conn)

    def read(self, conn: _Conn) -> bool:
        """What arrived on `conn`, and the answer it completes; whether `conn` stays open."""
        try:
            data = conn.sock.recv(1 << 16)
        except OSError:
            data = b""
        now = time.monotonic()
        if not data:
            self.drop(conn, now)
            return False
        conn.buf += data
        try:
            parsed = _parse(conn.buf)
        except ValueError:
            self.drop(conn, now)
            return False
        if parsed is None:
            return True
        code, head, body, used = parsed
        del conn.buf[:used]
        with self.lock:
            i, conn.index = conn.index, _NO_INDEX
            if i != _NO_INDEX and np.isnan(self.done_at[i]):
                self.status[i], self.headers[i], self.bodies[i] = code, head, body
                self.done_at[i] = now
                self.answered += 1
        # an answer nobody asked for on this connection, or its last
        if i == _NO_INDEX or head.get("connection", "").lower() == "close" or conn.buf:
            self.drop(conn, now)
            return False
        self.idle.append(conn)
        return True

    def sweep(self, live: set[_Conn], now: float) -> None:
        """Drop the connections whose request is past its timeout."""
        for conn in list(live):
            i = conn.index
            if i != _NO_INDEX and now - (self.start + self.times[i]) > self.timeout:
                live.discard(conn)
                self.drop(conn, now)

    def drop(self, conn: _Conn, now: float) -> None:
        with self.lock:
            conn.closed = True
            i, conn.index = conn.index, _NO_INDEX
        if i != _NO_INDEX:
            self.fail(i, now)
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        conn.sock.close()


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
