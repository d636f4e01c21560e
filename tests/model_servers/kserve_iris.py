"""KServe's own ModelServer (kserve 0.21) serving the iris model as "iris": KServe V1
(`/v1/models/iris:predict`) and the Open Inference Protocol V2 (`/v2/models/iris/infer`,
JSON and binary) on one port. Runs in the test's kserve virtual environment:

    python kserve_iris.py HTTP_PORT GRPC_PORT
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from iris_common import predict, train
from kserve import Model, ModelServer  # type: ignore[import-not-found,unused-ignore]
from kserve.utils.utils import (  # type: ignore[import-not-found,unused-ignore]
    get_predict_input,
    get_predict_response,
)


class Iris(Model):  # type: ignore[misc,unused-ignore]
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.model = train()
        self.ready = True

    def predict(self, payload: Any, headers: Any = None, response_headers: Any = None) -> Any:
        return get_predict_response(
            payload, predict(self.model, get_predict_input(payload)), self.name
        )


if __name__ == "__main__":
    http_port, grpc_port = int(sys.argv[1]), int(sys.argv[2])
    ModelServer(http_port=http_port, grpc_port=grpc_port, enable_grpc=False, workers=1).start(
        [Iris("iris")]
    )
