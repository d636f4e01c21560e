"""bench/servicer_cost.py drives the whole request path on fake streams: it must keep working
(and every stream must get its two answers: headers' continue, then its immediate response)."""

from __future__ import annotations

import uvloop

from bench.servicer_cost import run


def test_the_request_path_answers_every_fake_stream() -> None:
    cpu, wall, calls = uvloop.run(run(300, 16, 1.0, max_batch=8))
    assert cpu > 0 and wall > 0
    assert 300 / 8 <= calls < 300  # batched, and no batch over its maximum
