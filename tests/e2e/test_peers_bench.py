"""`python -m bench.peers` end to end for the MLProxy rows only (the peers are benchmarks, never
installed by the tests): the real stack (Redis, control plane, one ext_proc, Envoy, the emulator
as a one-worker fixed-capacity server), a tiny rate for two seconds per row, every answer
checked, the report and results written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.peers.run import main as peers_main

pytestmark = pytest.mark.e2e


def test_the_peer_benchmark_runs_mlproxy_through_the_real_stack(tmp_path: Path) -> None:
    out = tmp_path / "peers"
    argv = ["--systems", "mlproxy-adaptive,mlproxy-static", "--rates", "20"]
    argv += ["--duration", "2", "--warmup", "0.5", "--out", str(out), "--no-plot"]
    assert peers_main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["system"] for r in rows] == ["mlproxy-adaptive", "mlproxy-static"]
    for r in rows:
        assert r["rate"] == 20 and r["requests"] > 10, r
        assert r["wrong"] == 0 and r["errors"] == "-", r
        assert r["goodput_rps"] > 0 and r["p50_ms"] > 20, r  # a batch takes 20 ms at least
        assert r["mean_batch"] >= 1, r  # the emulator's batches of the window were read
    report = (out / "report.md").read_text()
    assert "python -m bench.peers --systems mlproxy-adaptive,mlproxy-static" in report
    assert "| mlproxy-static | 20 |" in report
    assert "nothing to compare" in report  # no peer ran
