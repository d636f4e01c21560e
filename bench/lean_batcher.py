"""The least a Python batching ext_proc on grpcio can do: the floor of batching, not of MLProxy.

    python bench/lean_batcher.py PORT MODEL_URL [--max-wait-ms 2] [--max-batch-size 64]
                                 [--max-in-flight 2]

It speaks the same protocol as MLProxy and bench/noop_extproc.py (headers -> continue, body ->
ImmediateResponse) and batches as a static policy does: each body's one KServe V1 instance is
queued; a batch leaves when it is full or `--max-wait-ms` after its first request, at most
`--max-in-flight` at a time, as one HTTP/1.1 POST over kept-alive connections to MODEL_URL;
each request is answered with its own prediction. Nothing else: no SLA clock, no checks of the
client's input or of the backend's answer beyond what Python raises, no metrics, no limits, no
fairness, no security rules. It is not safe to run in front of anything; bench/overhead.py
measures it beside the noop floor and MLProxy, to tell what batching itself costs in Python on
grpcio from what MLProxy's own work costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_listener")  # as `mlproxy extproc`

import grpc

from bench.noop_extproc import serve
from extproc.adapters import wire

_JSON = [("content-type", "application/json")]

Waiter = tuple[Any, "asyncio.Future[bytes]"]


class LeanBatcher:
    """One queue, one backend: a static policy's batches and nothing around them."""

    def __init__(self, url: str, wait: float, max_batch: int, max_in_flight: int) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.head = (
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        ).encode()
        self.wait, self.max_batch, self.max_in_flight = wait, max_batch, max_in_flight
        self.queue: list[Waiter] = []
        self.timer: asyncio.TimerHandle | None = None
        self.in_flight = 0
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.calls: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    async def submit(self, instance: Any) -> bytes:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        self.queue.append((instance, future))
        if len(self.queue) >= self.max_batch:
            self.flush()
        elif self.timer is None:
            self.timer = loop.call_later(self.wait, self.flush)
        return await future

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not self.queue or self.in_flight >= self.max_in_flight:
            return  # a call that ends flushes again
        batch, self.queue = self.queue[: self.max_batch], self.queue[self.max_batch :]
        self.in_flight += 1
        task = asyncio.get_running_loop().create_task(self.call(batch))
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)
        if self.queue:
            self.timer = asyncio.get_running_loop().call_later(self.wait, self.flush)

    async def call(self, batch: list[Waiter]) -> None:
        try:
            body = json.dumps({"instances": [x for x, _ in batch]}).encode()
            predictions = json.loads(await self.post(body))["predictions"]
            for (_, future), prediction in zip(batch, predictions, strict=True):
                if not future.done():
                    out = json.dumps({"predictions": [prediction]}).encode()
                    future.set_result(wire.encode_immediate_response(200, _JSON, out))
        except Exception as err:  # a benchmark's helper: every waiter gets the error
            for _, future in batch:
                if not future.done():
                    future.set_exception(err)
        finally:
            self.in_flight -= 1
            if self.queue and self.timer is None:
                self.flush()

    async def post(self, body: bytes) -> bytes:
        """The model's answer to one POST, over a kept-alive connection."""
        if self.idle:
            reader, writer = self.idle.pop()
        else:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.write(self.head + str(len(body)).encode() + b"\r\n\r\n" + body)
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        answer = await reader.readexactly(length)
        self.idle.append((reader, writer))
        return answer


def handler(lean: LeanBatcher) -> Any:
    async def process(request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        wire.decode_processing_request(await context.read())
        await context.write(wire.HEADERS_CONTINUE)
        body = wire.decode_processing_request(await context.read()).body
        await context.write(await lean.submit(json.loads(body)["instances"][0]))

    return process


if __name__ == "__main__":
    import uvloop

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("port", type=int)
    parser.add_argument("model_url", help="the model's predict URL")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-in-flight", type=int, default=2)
    args = parser.parse_args()
    lean = LeanBatcher(
        args.model_url, args.max_wait_ms / 1000.0, args.max_batch_size, args.max_in_flight
    )
    uvloop.run(serve(args.port, handler(lean)))
