"""Ray Serve's `@serve.batch` in front of the peer model (runs in Ray's virtual environment:
`python ray_app.py --port P`, see `bench/peers/systems.py`).

A local Ray instance on 127.0.0.1 only (no dashboard, no usage stats), Serve's HTTP proxy on
the given port, one replica of a deployment whose batch method is `@serve.batch`: it collects
up to `max_batch_size` calls, waiting at most `batch_wait_timeout_s` after the first, and runs
at most `max_concurrent_batches` (1) batches at once. Request body
`{"instances": [[8 floats]]}` (KServe V1), answer `{"predictions": [...]}`. Runs until SIGTERM
or SIGINT, then shuts Serve and Ray down.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import threading
from typing import Any

import ray  # type: ignore[import-not-found,unused-ignore]
from peer_common import PeerModel  # type: ignore[import-not-found,unused-ignore]
from ray import serve  # type: ignore[import-not-found,unused-ignore]
from starlette.requests import Request  # type: ignore[import-not-found,unused-ignore]
from starlette.responses import JSONResponse  # type: ignore[import-not-found,unused-ignore]

MAX_BATCH = int(os.environ.get("PEER_MAX_BATCH", "64"))
WAIT_S = float(os.environ.get("PEER_WAIT_MS", "37.5")) / 1000.0
MAX_ONGOING = int(os.environ.get("PEER_MAX_ONGOING", str(MAX_BATCH)))


# no per-request access log lines (MLProxy's Envoy writes none either)
NO_ACCESS_LOG = {"enable_access_log": False}


@serve.deployment(num_replicas=1, max_ongoing_requests=MAX_ONGOING, logging_config=NO_ACCESS_LOG)
class Peer:
    def __init__(self) -> None:
        self.model = PeerModel()

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=WAIT_S)  # type: ignore[misc,untyped-decorator,unused-ignore]
    async def run(self, instances: list[list[float]]) -> list[list[float]]:
        answers: list[list[float]] = await self.model.run(instances)
        return answers

    async def __call__(self, request: Request) -> Any:
        try:
            body = await request.json()
            instances = body["instances"]
            if not isinstance(instances, list) or not instances:
                raise ValueError("instances must be a non-empty list")
        except (ValueError, KeyError, TypeError) as err:
            return JSONResponse({"error": f"bad request: {err}"}, status_code=400)
        predictions = await asyncio.gather(*(self.run(x) for x in instances))
        return {"predictions": list(predictions)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--num-cpus", type=int, default=2)
    args = ap.parse_args()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    ray.init(
        num_cpus=args.num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        configure_logging=True,
        log_to_driver=False,  # the workers' logs stay in Ray's files, not echoed here
    )
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": args.port}, logging_config=NO_ACCESS_LOG
        )
        serve.run(Peer.bind(), name="peer", route_prefix="/predict")  # type: ignore[attr-defined,unused-ignore]
        print("ready", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
