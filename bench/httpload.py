"""A lean closed-loop HTTP/1.1 load generator for benchmarks.

Each of C keep-alive connections sends one request, reads the whole answer, and sends the
next, for a fixed time. Raw asyncio streams (no HTTP library) keep the generator's own CPU cost
per request small, since it shares the machine with what it measures.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["CLIENT_HEADERS", "LoadResult", "run_load"]

# What a real client adds to a request (a browser or SDK behind a login): 12 headers, 1.6 KB,
# credentials among them. `run_load(..., headers=CLIENT_HEADERS)`.
CLIENT_HEADERS = (
    "Authorization: Bearer " + "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9." + "x" * 700 + ".sig\r\n"
    "Cookie: session=" + "c" * 64 + "; prefs=" + "p" * 200 + "; _ga=GA1.2.1234567890.1700000000\r\n"
    "User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36\r\n"
    "Accept: application/json, text/plain, */*\r\n"
    "Accept-Encoding: gzip, deflate, br\r\n"
    "Accept-Language: en-US,en;q=0.9,de;q=0.8\r\n"
    "Origin: https://app.example.com\r\n"
    "Referer: https://app.example.com/dashboard/models/demo\r\n"
    "X-Api-Key: " + "k" * 40 + "\r\n"
    "X-Tenant-Id: tenant-0042\r\n"
    "X-Client-Version: 4.18.2\r\n"
    "Cache-Control: no-cache\r\n"
)


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    statuses: dict[int, int] = field(default_factory=dict)
    wrong: int = 0  # 200 answers that failed the check
    elapsed: float = 0.0
    # MLProxy's own timing headers of the successful answers, in seconds (when present):
    # x-mlproxy-time-ms (in ext_proc) and x-mlproxy-queue-ms (of which in the queue).
    in_extproc: list[float] = field(default_factory=list)
    queued: list[float] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def rate(self) -> float:
        return self.ok / self.elapsed if self.elapsed else 0.0


_TIMING = {b"x-mlproxy-time-ms:": "in_extproc", b"x-mlproxy-queue-ms:": "queued"}


async def _request(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, raw: bytes
) -> tuple[int, bytes, dict[str, float]]:
    writer.write(raw)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    timing: dict[str, float] = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b" ")
        name = name.lower()
        if name == b"content-length:":
            length = int(value)
        elif name in _TIMING:
            timing[_TIMING[name]] = float(value) / 1000.0
    body = await reader.readexactly(length) if length else b""
    return status, body, timing


async def run_load(
    host: str,
    port: int,
    path: str,
    bodies: Sequence[bytes],
    concurrency: int,
    duration: float,
    check: Callable[[int, bytes], bool] | None = None,
    warmup: float = 0.5,
    headers: str = "",
) -> LoadResult:
    """Closed loop for `warmup` + `duration` seconds; only the last `duration` is recorded.
    `check(i, body)` says whether the answer to bodies[i] is right. `headers`: more header
    lines (each ending in CRLF) sent with every request."""
    raws = [
        (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"{headers}Content-Length: {len(b)}\r\n\r\n"
        ).encode()
        + b
        for b in bodies
    ]
    result = LoadResult()
    start = time.perf_counter()
    record_from = start + warmup
    stop_at = record_from + duration
    counter = 0

    async def conn() -> None:
        nonlocal counter
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while True:
                t0 = time.perf_counter()
                if t0 >= stop_at:
                    return
                i = counter % len(raws)
                counter += 1
                status, body, timing = await _request(reader, writer, raws[i])
                t1 = time.perf_counter()
                if t0 < record_from:
                    continue
                result.statuses[status] = result.statuses.get(status, 0) + 1
                if status == 200:
                    if check is not None and not check(i, body):
                        result.wrong += 1
                    result.latencies.append(t1 - t0)
                    if "in_extproc" in timing:
                        result.in_extproc.append(timing["in_extproc"])
                    if "queued" in timing:
                        result.queued.append(timing["queued"])
        finally:
            writer.close()

    await asyncio.gather(*(conn() for _ in range(concurrency)))
    result.elapsed = min(time.perf_counter(), stop_at) - record_from
    return result
