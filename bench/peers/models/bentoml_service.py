"""BentoML's own adaptive batcher in front of the peer model (runs in BentoML's virtual
environment: `bentoml serve bentoml_service:Peer`, see `bench/peers/systems.py`).

A batchable API (`@bentoml.api(batchable=True)`): BentoML's CorkDispatcher queues the requests
of one worker, runs one batch at a time, sizes batches from its own fit of the batch time and
cancels (503) a request it predicts will miss `max_latency_ms`. One worker, so one batcher and
one model, like the one-batch-at-a-time server behind MLProxy. Request body
`{"instances": [[8 floats]]}`; answer: the list of the request's predictions.
"""

from __future__ import annotations

import os

import bentoml  # type: ignore[import-not-found,unused-ignore]
from peer_common import PeerModel  # type: ignore[import-not-found,unused-ignore]

MAX_BATCH = int(os.environ.get("PEER_MAX_BATCH", "64"))
MAX_LATENCY_MS = int(os.environ.get("PEER_MAX_LATENCY_MS", "150"))


# no per-request access log line (MLProxy's Envoy writes none either)
@bentoml.service(workers=1, traffic={"timeout": 60}, logging={"access": {"enabled": False}})
class Peer:
    def __init__(self) -> None:
        self.model = PeerModel()

    @bentoml.api(  # type: ignore[misc,untyped-decorator,unused-ignore]
        batchable=True, max_batch_size=MAX_BATCH, max_latency_ms=MAX_LATENCY_MS
    )
    async def predict(self, instances: list[list[float]]) -> list[list[float]]:
        answers: list[list[float]] = await self.model.run(instances)
        return answers
