"""bench/httpload.py against a small HTTP/1.1 server of this test: every request is well formed,
carries `headers` when asked, and each answer is checked against its own body."""

from __future__ import annotations

import asyncio

from bench.httpload import CLIENT_HEADERS, run_load


async def serve(seen: list[dict[str, str]]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(": ")
                        headers[name.lower()] = value
                body = await reader.readexactly(int(headers["content-length"]))
                seen.append({**headers, "body": body.decode()})
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def test_each_request_carries_the_client_headers_and_its_own_body() -> None:
    seen: list[dict[str, str]] = []
    server = await serve(seen)
    port = server.sockets[0].getsockname()[1]
    bodies = [b'{"i": 0}', b'{"i": 1}']
    try:
        result = await run_load(
            "127.0.0.1",
            port,
            "/p",
            bodies,
            concurrency=2,
            duration=0.2,
            check=lambda i, body: body == bodies[i],
            warmup=0.0,
            headers=CLIENT_HEADERS,
        )
    finally:
        server.close()
        await server.wait_closed()
    assert result.ok > 0 and result.wrong == 0
    sent = seen[0]
    assert sent["authorization"].startswith("Bearer ")
    assert sent["cookie"].startswith("session=")
    assert (
        len([k for k in sent if k not in ("host", "content-type", "content-length", "body")]) == 12
    )
    assert {s["body"] for s in seen} <= {b.decode() for b in bodies}


async def test_without_headers_a_request_has_only_its_own() -> None:
    seen: list[dict[str, str]] = []
    server = await serve(seen)
    port = server.sockets[0].getsockname()[1]
    try:
        await run_load("127.0.0.1", port, "/p", [b"{}"], 1, 0.05, warmup=0.0)
    finally:
        server.close()
        await server.wait_closed()
    assert set(seen[0]) == {"host", "content-type", "content-length", "body"}
