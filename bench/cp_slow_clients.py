"""How much memory slow clients cost the control plane: starts a real Redis and a real
`mlproxy controlplane` on loopback, opens N connections that each stall part-way through a
request, and samples the server's resident memory (VmRSS) while they are held.

    python -m bench.cp_slow_clients --clients 4000 --kind body-admin
    python -m bench.cp_slow_clients --clients 4000 --kind headers --max-connections 100000

Kinds: `headers` (request headers never finished), `body` (an unauthenticated PUT announcing
a 60 KB body, sending most of it and stalling), `body-admin` (the same with a valid admin token:
the worst case, as the body is read and buffered), `mixed` (a third of each).
Loopback only; every process it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from mlproxy.redis_server import redis_argv
from mlproxy.stack import Child, free_port, http_ok, tcp_ok

TOKEN = "bench-admin-token-0123456789"
BODY = 60_000  # under the default MLPROXY_MAX_BODY_BYTES (65536)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def stall(port: int, kind: str) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    if kind == "headers":
        s.sendall(b"GET /v1/policies HTTP/1.1\r\nHost: cp\r\nX-Slow: " + b"a" * 8000)
        return s
    token = f"Authorization: Bearer {TOKEN}\r\n" if kind == "body-admin" else ""
    head = (
        "PUT /v1/policies/slow HTTP/1.1\r\nHost: cp\r\nContent-Type: application/json\r\n"
        f"{token}Content-Length: {BODY}\r\n\r\n"
    )
    s.setblocking(False)
    with contextlib.suppress(BlockingIOError, ConnectionError):
        s.send(head.encode() + b" " * (BODY - 100))
    return s


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=4000)
    p.add_argument("--kind", choices=["headers", "body", "body-admin", "mixed"], default="mixed")
    p.add_argument("--max-connections", type=int, help="MLPROXY_MAX_CONNECTIONS (default: its)")
    p.add_argument("--hold", type=float, default=5.0, help="seconds to hold them, sampling")
    args = p.parse_args()
    if args.clients > 20_000:
        p.error("--clients: at most 20000")
    run = Path(tempfile.mkdtemp(prefix="cp-slow-"))
    rport, cport = free_port(), free_port()
    redis = Child("redis", redis_argv("127.0.0.1", rport, run), run / "redis.log")
    redis.ready = lambda: tcp_ok("127.0.0.1", rport)
    env = {
        "MLPROXY_REDIS_URL": f"redis://127.0.0.1:{rport}/0",
        "MLPROXY_ADMIN_TOKENS": TOKEN,
        "MLPROXY_TUNER_INTERVAL_S": "0",
        # long deadlines: measure what held connections cost, not how fast they are cut
        "MLPROXY_HEADER_TIMEOUT_S": "600",
        "MLPROXY_BODY_TIMEOUT_S": "600",
    }
    if args.max_connections:
        env["MLPROXY_MAX_CONNECTIONS"] = str(args.max_connections)
    cp = Child(
        "controlplane",
        [sys.executable, "-m", "mlproxy.cli", "controlplane", "--port", str(cport)],
        run / "controlplane.log",
        env=env,
        ready=lambda: http_ok(f"http://127.0.0.1:{cport}/readyz"),
    )
    held: list[socket.socket] = []
    try:
        redis.start()
        redis.wait_ready(15)
        cp.start()
        cp.wait_ready(30)
        assert cp.proc is not None
        idle = rss_mib(cp.proc.pid)
        kinds = ["headers", "body", "body-admin"] if args.kind == "mixed" else [args.kind]
        for i in range(args.clients):
            held.append(stall(cport, kinds[i % len(kinds)]))
        peak = idle
        deadline = time.monotonic() + args.hold
        while time.monotonic() < deadline:
            peak = max(peak, rss_mib(cp.proc.pid))
            time.sleep(0.2)
        open_now = sum(1 for s in held if _open(s))
        print(
            f"{args.clients} {args.kind} clients, max connections "
            f"{args.max_connections or 'default'}: control plane RSS {idle:.0f} MiB idle, "
            f"{peak:.0f} MiB peak; {open_now} connections still open (the rest refused)"
        )
    finally:
        for s in held:
            s.close()
        cp.stop()
        redis.stop()
    return 0


def _open(s: socket.socket) -> bool:
    """Not closed by the server (it sends nothing to a stalled client it keeps)."""
    s.setblocking(False)
    try:
        data = s.recv(65536, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return bool(data) and b"503" not in data[:20] and b"401" not in data[:20]


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
