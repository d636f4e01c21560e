"""An MLServer (1.7) runtime serving the iris model over the Open Inference Protocol V2
(`mlserver start DIR`, with `implementation: mlserver_iris.IrisRuntime` in the
model-settings.json that tests/real_servers.py writes). MLServer's own adaptive batching is
left off: MLProxy batches in front of it."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from iris_common import predict, train
from mlserver import MLModel  # type: ignore[import-not-found,unused-ignore]
from mlserver.codecs import NumpyCodec  # type: ignore[import-not-found,unused-ignore]
from mlserver.types import (  # type: ignore[import-not-found,unused-ignore]
    InferenceRequest,
    InferenceResponse,
)


class IrisRuntime(MLModel):  # type: ignore[misc,unused-ignore]
    async def load(self) -> bool:
        self.model = train()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        rows = NumpyCodec.decode_input(payload.inputs[0])
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[NumpyCodec.encode_output("probabilities", predict(self.model, rows))],
        )
