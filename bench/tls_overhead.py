"""ext_proc's CPU per request with and without mTLS on the Envoy -> ext_proc hop: the local
stack (Redis, control plane, one replica, Envoy), 512 distinct demo requests 64 at a time after
a warm-up, twice each. Run: `.venv/bin/python -m bench.tls_overhead`."""

from __future__ import annotations

import asyncio
import json
import os

from mlproxy.demo import random_inputs
from mlproxy.loadgen import burst, percentile
from mlproxy.stack import Stack


def ext_proc_cpu(stack: Stack) -> float:
    """CPU seconds (user + system) ext_proc-0 has used."""
    c = stack.child("extproc-0")
    assert c.proc is not None
    with open(f"/proc/{c.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    bodies = [json.dumps({"instances": [x]}).encode() for x in random_inputs(512)]
    for _ in range(2):
        for tls in (False, True):
            with Stack(envoy_port=0, controlplane_port=0, model_port=0, tls=tls) as stack:
                url = f"{stack.envoy_url}/v1/models/demo:predict"
                asyncio.run(burst(url, bodies[:64], 16))  # warm-up
                cpu0 = ext_proc_cpu(stack)
                res = asyncio.run(burst(url, bodies, 64))
                cpu_us = 1e6 * (ext_proc_cpu(stack) - cpu0) / len(res)
                lat = [r.latency * 1000 for r in res]
                ok = sum(r.status == 200 for r in res)
                batch = sum(r.batch_size for r in res) / len(res)
                print(
                    f"tls={tls!s:5} answered 200: {ok}/{len(res)}  ext_proc CPU {cpu_us:.0f} "
                    f"us/request  p50 {percentile(lat, 50):.1f} ms  p99 {percentile(lat, 99):.1f}"
                    f" ms  mean batch {batch:.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
