"""`mlproxy demo`: start the stack, send a burst of distinct inputs through Envoy, and check
that every answer equals the model's own unbatched answer for that input."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import statistics
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from mlproxy.loadgen import burst, percentile
from mlproxy.stack import Stack, StackError

__all__ = ["model_counters", "random_inputs", "run_demo"]

log = logging.getLogger(__name__)


def random_inputs(n: int, n_features: int = 16, seed: int = 1) -> list[list[float]]:
    rng = random.Random(seed)
    return [[round(rng.uniform(-2, 2), 4) for _ in range(n_features)] for _ in range(n)]


def model_counters(metrics_url: str) -> dict[str, float]:
    """Predict calls and instances the demo model has answered."""
    with urllib.request.urlopen(metrics_url, timeout=5) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in (
                "demo_model_predict_calls_total",
                "demo_model_predict_instances_total",
            ):
                out[sample.name.removeprefix("demo_model_predict_").removesuffix("_total")] = (
                    sample.value
                )
    return out


def run_demo(
    requests: int = 512, concurrency: int = 64, port: int = 0, run_dir: Path | None = None
) -> int:
    inputs = random_inputs(requests)
    bodies = [json.dumps({"instances": [x]}).encode() for x in inputs]
    try:
        with Stack(envoy_port=port, controlplane_port=0, run_dir=run_dir) as stack:
            print("stack up:", ", ".join(f"{k} {v}" for k, v in stack.endpoints().items()))
            metrics_url = f"{stack.model_url}/metrics"
            before = model_counters(metrics_url)
            url = f"{stack.envoy_url}/v1/models/demo:predict"
            results = asyncio.run(burst(url, bodies, concurrency))
            after = model_counters(metrics_url)
            # The model's own answer for each input, one input per call, straight to the model.
            direct = asyncio.run(burst(f"{stack.model_url}/v1/models/demo:predict", bodies, 4))
    except StackError as err:
        log.error("%s", err)
        return 1
    calls = after["calls"] - before["calls"]
    instances = after["instances"] - before["instances"]
    ok = [r for r in results if r.status == 200]
    wrong = [
        r.index
        for r, d in zip(results, direct, strict=True)
        if r.status != 200 or d.status != 200 or json.loads(r.body) != json.loads(d.body)
    ]
    latencies = [r.latency * 1000 for r in ok]
    print(f"requests sent        {requests} (concurrency {concurrency})")
    print(f"answered 200         {len(ok)}")
    print(f"backend calls        {calls:.0f}")
    print(f"mean batch size      {instances / calls if calls else 0:.1f} instances per call")
    if latencies:
        print(
            f"latency p50 / p99    {statistics.median(latencies):.1f} / "
            f"{percentile(latencies, 99):.1f} ms"
        )
    print(f"answers checked      {requests} against the model's unbatched answers")
    if wrong:
        print(f"MISMATCH             {len(wrong)} answers differ, e.g. request #{wrong[0]}")
        return 1
    print("all answers match")
    return 0
