"""bench/overhead.py's policy for each `--mode` is one MLProxy accepts, with what it says."""

from __future__ import annotations

import pytest

from bench.overhead import _parser, _policies
from mlproxy_kernel.policy import parse_policies


@pytest.mark.parametrize(
    ("mode", "objective"), [("static", None), ("latency", "latency"), ("cost", "cost")]
)
def test_each_mode_is_a_valid_policy(mode: str, objective: str | None) -> None:
    args = _parser().parse_args(["--mode", mode, "--max-batch-size", "32"])
    (policy,) = parse_policies(_policies(args, "http://127.0.0.1:9"))
    assert policy.batching.mode == ("static" if mode == "static" else "adaptive")
    assert policy.batching.max_batch_size == 32
    if objective is not None:
        assert policy.batching.objective == objective
        assert policy.sla.latency_ms == 100 and policy.sla.percentile == 99
