"""Event loop lag of one ext_proc process while a peer on its gRPC port sends hostile messages.

    python bench/hostile_grpc.py [--kinds many-headers,huge-header,...] [--rounds 3]
                                 [--ext-proc-args '--max-headers 100']

Starts the demo model and one `mlproxy extproc` process on loopback ports. A raw gRPC client
(bytes in, bytes out, its own connection) sends each kind of hostile message `--rounds` times
while a well-behaved client, on another connection, sends one request every 50 ms and checks
each answer against the model's own. Printed per kind: how the server answered the hostile
stream, the good requests' latency, and the ext_proc process's `mlproxy_event_loop_lag_seconds`
histogram over that phase (samples above 50 ms / 250 ms / 1 s, and the largest bucket used).

Kinds (the 4 MB ones fit under the default gRPC receive limit, so the decoder sees them):
  many-headers     a 14 MB request-headers message with 2,000,000 one-letter headers
  many-headers-4m  the same with 550,000 headers (3.9 MB)
  huge-header      a request-headers message with one 4,000,000-byte header value
  tiny-fields      a ProcessingRequest of 2,000,000 two-byte fields (4 MB)
  oversized        a request-body message of 80 MB
  garbage          4 MB of random bytes
  protocol         a body before the headers, then a second headers message
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shlex
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc

from extproc.adapters.wire import _len_field
from mlproxy.demo import random_inputs
from mlproxy.demo_model import MLPModel
from mlproxy.stack import Child, free_port, http_ok

METHOD = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
PATH = "/v1/models/demo:predict"


def _len(number: int, payload: bytes) -> bytes:
    return _len_field(number, payload)


def header(key: str, value: bytes) -> bytes:
    return _len(1, _len(1, key.encode()) + _len(3, value))


def headers_message(entries: list[bytes] | bytes) -> bytes:
    joined = entries if isinstance(entries, bytes) else b"".join(entries)
    return _len(2, _len(1, joined))


def body_message(body: bytes) -> bytes:
    return _len(4, _len(1, body) + b"\x10\x01")  # end_of_stream


GOOD_HEADERS = headers_message(
    [header(":path", PATH.encode()), header(":method", b"POST"), header("x", b"y")]
)


def hostile(kind: str) -> list[bytes]:
    one = header("a", b"")  # 7 bytes on the wire
    if kind == "many-headers":
        return [headers_message(one * 2_000_000)]
    if kind == "many-headers-4m":
        return [headers_message(one * 550_000)]
    if kind == "huge-header":
        return [headers_message([header(":path", PATH.encode()), header("x", b"v" * 4_000_000)])]
    if kind == "tiny-fields":
        return [b"\x08\x00" * 2_000_000]  # field 1, varint 0
    if kind == "oversized":
        return [body_message(b"x" * 80_000_000)]
    if kind == "garbage":
        return [random.Random(1).randbytes(4_000_000)]
    if kind == "protocol":
        return [body_message(b"{}"), GOOD_HEADERS, GOOD_HEADERS]
    raise ValueError(kind)


def lag_histogram(metrics_url: str) -> dict[float, float]:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    out: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("mlproxy_event_loop_lag_seconds_bucket"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            out[float(le)] = float(line.rsplit(" ", 1)[1])
    return out


def lag_summary(before: dict[float, float], after: dict[float, float]) -> str:
    delta = {le: after[le] - before.get(le, 0.0) for le in after}
    total = delta[float("inf")]

    def over(bound: float) -> int:
        return int(total - delta[bound])

    used = [le for le in sorted(delta) if delta[le] < total]
    largest = "<= 5 ms" if not used else f"> {used[-1]:g} s"
    return (
        f"loop lag samples {int(total)}: >50 ms {over(0.05)}, >250 ms {over(0.2)} "
        f"(bucket 0.2 s), >1 s {over(1.0)}; largest {largest}"
    )


async def send_hostile(channel: grpc.aio.Channel, messages: list[bytes]) -> str:
    call = channel.stream_stream(METHOD)()
    answers: list[str] = []
    try:
        for m in messages:
            await call.write(m)
        await call.done_writing()
        while True:
            got = await asyncio.wait_for(call.read(), 60)
            if got is grpc.aio.EOF:
                break
            answers.append(f"{len(got)} bytes")
        code = await call.code()
        return f"answers {answers or 'none'}, status {code.name}"
    except grpc.aio.AioRpcError as err:
        return f"answers {answers or 'none'}, status {err.code().name}: {err.details()}"
    except TimeoutError:
        call.cancel()
        return f"answers {answers or 'none'}, still open after 60 s"


async def good_loop(
    channel: grpc.aio.Channel, stop: asyncio.Event, model: MLPModel
) -> tuple[list[float], int]:
    inputs = random_inputs(64, seed=7)
    latencies: list[float] = []
    wrong = 0
    i = 0
    while not stop.is_set():
        x = inputs[i % len(inputs)]
        i += 1
        start = time.perf_counter()
        call = channel.stream_stream(METHOD)()
        await call.write(GOOD_HEADERS)
        await call.read()
        await call.write(body_message(json.dumps({"instances": [x]}).encode()))
        reply = await call.read()
        latencies.append(time.perf_counter() - start)
        expected = json.dumps({"predictions": model.predict([x])}).encode()
        if reply is grpc.aio.EOF or expected.replace(b" ", b"") not in reply.replace(b" ", b""):
            wrong += 1
        await asyncio.sleep(0.05)
    return latencies, wrong


async def phase(port: int, metrics_url: str, kind: str, rounds: int) -> None:
    opts = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_send_message_length", -1)]
    messages = hostile(kind)
    model = MLPModel()
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as bad,
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as good,
    ):
        await good.channel_ready()
        await bad.channel_ready()
        before = lag_histogram(metrics_url)
        stop = asyncio.Event()
        loop = asyncio.ensure_future(good_loop(good, stop, model))
        await asyncio.sleep(0.3)
        outcomes = [await send_hostile(bad, messages) for _ in range(rounds)]
        await asyncio.sleep(0.3)
        stop.set()
        latencies, wrong = await loop
        after = lag_histogram(metrics_url)
    latencies.sort()
    print(f"{kind}:")
    for o in sorted(set(outcomes)):
        print(f"  hostile stream: {o}")
    print(
        f"  good requests {len(latencies)}, wrong answers {wrong}, latency max "
        f"{latencies[-1] * 1000:.0f} ms, median {latencies[len(latencies) // 2] * 1000:.1f} ms"
    )
    print(f"  {lag_summary(before, after)}")


def _policies(run_dir: Path, model_port: int) -> Path:
    """The policies file: the demo model, statically batched."""
    policies = run_dir / "policies.json"
    policies.write_text(
        json.dumps(
            {
                "policies": [
                    {
                        "name": "demo",
                        "match": {"path": PATH},
                        "backend": {"url": f"http://127.0.0.1:{model_port}{PATH}"},
                        "batching": {"mode": "static", "max_batch_size": 8, "max_wait_ms": 2},
                    }
                ]
            }
        )
    )
    return policies


def _children(
    run_dir: Path, model_port: int, port: int, metrics_port: int, ext_proc_args: str
) -> list[Child]:
    """The demo model and one `mlproxy extproc` process in front of it."""
    policies = _policies(run_dir, model_port)
    py = [sys.executable, "-m", "mlproxy.cli"]
    host = ["--host", "127.0.0.1"]
    return [
        Child(
            "model",
            [*py, "model", *host, "--port", str(model_port)],
            run_dir / "model.log",
            ready=lambda: http_ok(f"http://127.0.0.1:{model_port}/healthz"),
        ),
        Child(
            "extproc",
            [
                *py,
                "extproc",
                *host,
                "--port",
                str(port),
                "--metrics-port",
                str(metrics_port),
                "--policies",
                str(policies),
                *shlex.split(ext_proc_args),
            ],
            run_dir / "extproc.log",
            ready=lambda: http_ok(f"http://127.0.0.1:{metrics_port}/metrics"),
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--kinds",
        default="many-headers,many-headers-4m,huge-header,tiny-fields,oversized,garbage,protocol",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ext-proc-args", default="", help="extra `mlproxy extproc` arguments")
    args = ap.parse_args(argv)
    run_dir = Path(tempfile.mkdtemp(prefix="mlproxy-hostile-"))
    model_port, port, metrics_port = free_port(), free_port(), free_port()
    children = _children(run_dir, model_port, port, metrics_port, args.ext_proc_args)
    try:
        for child in children:
            child.start()
            child.wait_ready(30)
        metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        for kind in args.kinds.split(","):
            asyncio.run(phase(port, metrics_url, kind, args.rounds))
            dead = [c.name for c in children if c.exited() is not None]
            if dead:
                print(f"  {dead} exited; see {run_dir}")
                return 1
    finally:
        for child in reversed(children):
            child.stop()
    print(f"logs: {run_dir}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("GRPC_EXPERIMENTS", "-event_engine_listener")
    sys.exit(main())
