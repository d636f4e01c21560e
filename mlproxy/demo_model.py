"""The demo model server: a numpy MLP behind KServe's V1 protocol.

`POST /v1/models/{name}:predict` with `{"instances": [[x1..x16], ...]}` answers
`{"predictions": [[p1..p4], ...]}` (class probabilities, rounded to 6 decimals). The weights are
fixed (seeded), so the same input always gets the same answer, batched or not. With 1,024-wide
hidden layers one call streams 8 MB of weights through the CPU however many rows it has, so the
cost per input really falls with batch size. `/metrics` counts calls, instances and batch sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
from typing import Any

import numpy as np
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

__all__ = ["MLPModel", "main", "make_app"]

log = logging.getLogger(__name__)


class MLPModel:
    def __init__(
        self, n_features: int = 16, hidden: int = 1024, n_classes: int = 4, seed: int = 7
    ) -> None:
        rng = np.random.default_rng(seed)
        self.n_features = n_features
        self.w1 = rng.standard_normal((n_features, hidden)) / math.sqrt(n_features)
        self.b1 = rng.standard_normal(hidden) * 0.1
        self.w2 = rng.standard_normal((hidden, hidden)) / math.sqrt(hidden)
        self.b2 = rng.standard_normal(hidden) * 0.1
        self.w3 = rng.standard_normal((hidden, n_classes)) / math.sqrt(hidden)

    def validate(self, instances: Any) -> str | None:
        """Why these instances cannot be used, or None."""
        if not isinstance(instances, list) or not instances:
            return "'instances' must be a non-empty array"
        for i, inst in enumerate(instances):
            if (
                not isinstance(inst, list)
                or len(inst) != self.n_features
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in inst)
            ):
                return f"instance {i}: expected an array of {self.n_features} numbers"
        return None

    def predict(self, instances: list[list[float]]) -> list[list[float]]:
        x = np.asarray(instances, dtype=np.float64)
        h = np.maximum(x @ self.w1 + self.b1, 0.0)
        h = np.maximum(h @ self.w2 + self.b2, 0.0)
        z = h @ self.w3
        z -= z.max(axis=1, keepdims=True)
        p = np.exp(z)
        p /= p.sum(axis=1, keepdims=True)
        return [[round(float(v), 6) for v in row] for row in p]


def make_app(model: MLPModel, name: str = "demo", delay_ms: float = 0.0) -> web.Application:
    registry = CollectorRegistry()
    calls = Counter("demo_model_predict_calls", "Predict calls answered 200.", registry=registry)
    instances_total = Counter(
        "demo_model_predict_instances", "Instances predicted.", registry=registry
    )
    errors = Counter("demo_model_predict_errors", "Predict calls refused.", registry=registry)
    batch = Histogram(
        "demo_model_batch_size",
        "Instances per predict call.",
        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        registry=registry,
    )

    def error(status: int, message: str) -> web.Response:
        errors.inc()
        return web.json_response({"error": message}, status=status)

    async def predict(request: web.Request) -> web.Response:
        if request.match_info["model"] != name:
            return error(404, f"model {request.match_info['model']} does not exist")
        try:
            doc = json.loads(await request.read())
        except ValueError as err:
            return error(400, f"body is not valid JSON: {err}")
        instances = doc.get("instances") if isinstance(doc, dict) else None
        problem = model.validate(instances)
        if problem is not None:
            return error(400, problem)
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000.0)
        assert isinstance(instances, list)
        out = model.predict(instances)
        calls.inc()
        instances_total.inc(len(instances))
        batch.observe(len(instances))
        return web.json_response({"predictions": out})

    async def ready(request: web.Request) -> web.Response:
        if request.match_info["model"] != name:
            return error(404, f"model {request.match_info['model']} does not exist")
        return web.json_response({"name": name, "ready": True})

    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), content_type="text/plain")

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/models/{model}:predict", predict)
    app.router.add_get("/v1/models/{model}", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app


async def healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="mlproxy model", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--name", default="demo", help="model name in the URL")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden layer width")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="extra latency per call")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s model %(levelname)s %(message)s")
    app = make_app(MLPModel(hidden=args.hidden), args.name, args.delay_ms)
    log.info("demo model %r on http://%s:%d", args.name, args.host, args.port)
    web.run_app(app, host=args.host, port=args.port, print=None, access_log=None)
