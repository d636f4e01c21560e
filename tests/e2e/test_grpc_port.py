"""ext_proc's gRPC port limits through the real Envoy: a burst of slow clients keeps every
ext_proc stream and each gets its own answer, and what Envoy accepts passes the header caps."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

from mlproxy.stack import Stack
from tests.e2e.test_envoy import model_url, post

pytestmark = pytest.mark.e2e

BURST = 3_000  # above grpcio's default backlog of 1,000 streams waiting to be taken


def envoy_stat(stack: Stack, name: str) -> int:
    url = f"http://127.0.0.1:{stack.admin_port}/stats?filter=^{name}$"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    for line in text.splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


async def slow_client(port: int, ident: str, release: asyncio.Event) -> tuple[int, bytes]:
    """POST a body in two parts, the second once `release` is set: Envoy opens the ext_proc
    stream with the headers and holds it until the whole body is there."""
    body = json.dumps({"instances": [{"id": ident}]}).encode()
    head = (
        "POST /v1/models/patient:predict HTTP/1.1\r\nHost: mlproxy\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body[:5])
        await writer.drain()
        await release.wait()
        writer.write(body[5:])
        await writer.drain()
        head_in = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 120)
        lines = head_in.decode("latin-1").split("\r\n")
        fields = dict(line.lower().partition(": ")[::2] for line in lines[1:] if line)
        return int(lines[0].split(" ")[1]), await reader.readexactly(int(fields["content-length"]))
    finally:
        writer.close()


async def test_a_burst_of_slow_clients_is_held_and_each_answered(stack: Stack) -> None:
    """The finding: 9,000 slow clients at once got ~1,500 ext_proc streams cancelled and a
    normal request a 500. grpcio cancelled streams that waited to be taken by the process.
    The slow clients use policy `patient`, whose SLA (5 minutes) is how long a body may take
    to arrive after its headers."""
    started = "http.ingress.ext_proc.streams_started"
    failed = "http.ingress.ext_proc.streams_failed"
    before, failed_before = envoy_stat(stack, started), envoy_stat(stack, failed)
    release = asyncio.Event()
    clients = [
        asyncio.ensure_future(slow_client(stack.envoy_port, f"slow-{i}", release))
        for i in range(BURST)
    ]
    try:
        # every client's ext_proc stream is open (Envoy sent its headers)
        deadline = time.monotonic() + 120
        while envoy_stat(stack, started) < before + BURST:
            assert time.monotonic() < deadline, "Envoy did not open the streams in 120 s"
            assert not any(c.done() for c in clients), "a slow client was answered early"
            await asyncio.sleep(0.2)
        status, _, data = await post(
            model_url(stack, "echo"), {"instances": [{"id": "normal"}]}, timeout=60
        )
        assert status == 200
        assert json.loads(data) == {"predictions": [{"echo": "normal"}]}
    finally:
        release.set()
        results = await asyncio.gather(*clients, return_exceptions=True)
    answers = [r if isinstance(r, tuple) else (0, repr(r).encode()) for r in results]
    wrong = [(i, a) for i, a in enumerate(answers) if a[0] != 200]
    assert not wrong, f"{len(wrong)} of {BURST} slow clients failed, e.g. {wrong[:3]}"
    for i, (_, data) in enumerate(answers):
        assert json.loads(data) == {"predictions": [{"echo": f"slow-{i}"}]}
    assert envoy_stat(stack, failed) == failed_before


async def test_a_request_at_envoys_own_header_limits_passes_the_header_caps(stack: Stack) -> None:
    """Envoy's defaults: 100 request headers, 60 KiB of them. Envoy adds its own (pseudo-
    headers, x-request-id, x-forwarded-proto) before ext_proc sees them: the caps leave room."""
    body = json.dumps({"instances": [{"id": "many-headers"}]}).encode()
    fields = [("Host", "mlproxy"), ("Content-Type", "application/json")]
    fields += [("Content-Length", str(len(body)))]
    fields += [(f"x-h-{i:02}", "v") for i in range(96)]
    # Envoy counts each header line, "name: value" and its line end (and a little more)
    used = sum(len(k) + len(v) + 4 for k, v in fields) + len("x-big") + 4
    fields.append(("x-big", "v" * (60 * 1024 - used - 512)))
    assert len(fields) == 100
    head = "POST /v1/models/echo:predict HTTP/1.1\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in fields) + "\r\n"
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.envoy_port)
    try:
        writer.write(head.encode() + body)
        await writer.drain()
        head_in = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
        lines = head_in.decode("latin-1").split("\r\n")
        got = dict(line.lower().partition(": ")[::2] for line in lines[1:] if line)
        data = await reader.readexactly(int(got["content-length"]))
    finally:
        writer.close()
    assert lines[0].split(" ")[1] == "200", (lines[0], data)
    assert json.loads(data) == {"predictions": [{"echo": "many-headers"}]}
