"""The floor of a Python ext_proc on grpcio, three ways, in one run.

    python bench/floor.py [--duration 5] [--concurrency 64,1] [--rounds 2]

Runs bench/noop_extproc.py's three variants, each behind its own Envoy, back to back and
alternating for `--rounds`: `answer` (bench/overhead.py's floor: four gRPC messages a request,
each answered at once), `batch` (the body's answer held and released every 2 ms by one timer:
what holding streams costs) and `no-header-response` (Envoy's STREAMED body mode with
`send_body_without_waiting_for_header_response`: three messages a request, one round trip
less). It prints throughput, p50 and each noop's and Envoy's CPU per request, to weigh the
ext_proc protocol's options (docs/benchmarks.md, "Overhead of the data path").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.httpload import run_load
from bench.noop_extproc import VARIANTS
from bench.overhead import HIDDEN, cpu_seconds, start_noop
from mlproxy.demo import random_inputs
from mlproxy.loadgen import percentile
from mlproxy.stack import Stack


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--concurrency", default="64,1")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    bodies = [json.dumps({"instances": [x]}).encode() for x in random_inputs(512, seed=3)]

    def check(i: int, body: bytes) -> bool:
        return body.startswith(b'{"predictions"')

    stack = Stack(envoy_port=0, model_args=["--hidden", str(HIDDEN)])
    print("| concurrency | variant | req/s | p50 ms | non-200 | CPU us/req: noop | envoy |")
    print("|---|---|---|---|---|---|---|", flush=True)
    with stack:
        started = {v: start_noop(stack, v) for v in VARIANTS}
        for c in [int(x) for x in args.concurrency.split(",")]:
            for _ in range(args.rounds):
                for variant, (port, noop, envoy) in started.items():
                    assert noop.proc is not None and envoy.proc is not None
                    pids = {"noop": noop.proc.pid, "envoy": envoy.proc.pid}
                    before = {k: cpu_seconds(p) for k, p in pids.items()}
                    r = asyncio.run(
                        run_load(
                            stack.host,
                            port,
                            "/v1/models/demo:predict",
                            bodies,
                            c,
                            args.duration,
                            check,
                        )
                    )
                    after = {k: cpu_seconds(p) for k, p in pids.items()}
                    n = max(r.ok, 1)
                    cpu = {k: (after[k] - before[k]) / n * 1e6 for k in pids}
                    non200 = sum(k for s, k in r.statuses.items() if s != 200)
                    print(
                        f"| {c} | {variant} | {r.rate:.0f} | "
                        f"{percentile(r.latencies, 50) * 1000:.3f} | {non200} | "
                        f"{cpu['noop']:.0f} | {cpu['envoy']:.0f} |",
                        flush=True,
                    )
    assert stack.run_dir is not None
    shutil.rmtree(stack.run_dir, ignore_errors=True)  # its logs are kept when a run fails
    return 0


if __name__ == "__main__":
    sys.exit(main())
