"""Drives an Open Inference Protocol V2 server with NVIDIA's own client, tritonclient (HTTP),
as a user would; runs in the test's kserve virtual environment (where tritonclient is).

Reads a job as JSON on stdin, sends every request concurrently with `async_infer`, prints one
JSON line per request, in order: its id, and the output as tritonclient decoded it
(`as_numpy`) or the error it raised.

    {"url": "127.0.0.1:8080[/base]", "model": "iris", "output": "output-0",
     "requests": [{"id": "r0", "rows": [[...], ...], "datatype": "FP64",
                   "binary_input": false, "binary_output": false}, ...],
     "concurrency": 16}
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
from tritonclient import http  # type: ignore[import-not-found,unused-ignore]
from tritonclient.utils import InferenceServerException  # type: ignore[import-not-found,unused-ignore]

DTYPES = {"FP64": np.float64, "FP32": np.float32, "INT64": np.int64, "BYTES": np.object_}


def main() -> None:
    job = json.load(sys.stdin)
    client = http.InferenceServerClient(job["url"], concurrency=job.get("concurrency", 16))
    pending = []
    for spec in job["requests"]:
        rows = np.asarray(spec["rows"], dtype=DTYPES[spec["datatype"]])
        tensor = http.InferInput(spec.get("input", "x"), list(rows.shape), spec["datatype"])
        tensor.set_data_from_numpy(rows, binary_data=spec.get("binary_input", False))
        output = http.InferRequestedOutput(
            job["output"], binary_data=spec.get("binary_output", False)
        )
        # KServe reads a body without this content type as binary (tritonclient sets none)
        json_body = not spec.get("binary_input")
        pending.append(
            client.async_infer(
                job["model"],
                [tensor],
                outputs=[output],
                request_id=spec["id"],
                headers={"Content-Type": "application/json"} if json_body else None,
            )
        )
    for spec, call in zip(job["requests"], pending, strict=True):
        line: dict[str, Any] = {"id": spec["id"]}
        try:
            result = call.get_result()
            answer = result.as_numpy(job["output"])
            line.update(
                status="ok",
                response_id=result.get_response().get("id"),
                shape=list(answer.shape),
                data=answer.tolist(),
            )
        except InferenceServerException as err:
            line.update(status="error", code=err.status(), error=err.message())
        print(json.dumps(line), flush=True)
    client.close()


if __name__ == "__main__":
    main()
