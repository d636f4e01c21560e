"""MLServer's adaptive batching in front of the peer model (runs in MLServer's virtual
environment: `mlserver start <dir>` with the model-settings.json that `bench/peers/systems.py`
writes, `implementation: mlserver_runtime.PeerRuntime`).

A custom MLModel runtime: MLServer's AdaptiveBatcher merges the V2 requests it collects for up
to `max_batch_time` seconds (or `max_batch_size` requests) into one request of shape [b, 8],
calls `predict` and splits the answer back by request. Request body: the V2 inference protocol,
one input "instances" of shape [1, 8], FP64; answer: one output "predictions" of shape [1, 2].
"""

from __future__ import annotations

import numpy as np
from mlserver import MLModel  # type: ignore[import-not-found,unused-ignore]
from mlserver.codecs import NumpyCodec  # type: ignore[import-not-found,unused-ignore]
from mlserver.types import (  # type: ignore[import-not-found,unused-ignore]
    InferenceRequest,
    InferenceResponse,
)
from peer_common import PeerModel  # type: ignore[import-not-found,unused-ignore]


class PeerRuntime(MLModel):  # type: ignore[misc,unused-ignore]
    async def load(self) -> bool:
        self.model = PeerModel()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = NumpyCodec.decode_input(payload.inputs[0])
        answers = await self.model.run(np.asarray(rows, dtype=np.float64).tolist())
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output("predictions", np.asarray(answers, np.float64))],
        )
