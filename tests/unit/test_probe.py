"""bench/probe.py, in a process of its own (it wraps the servicer's and the batcher's methods):
on bench/servicer_cost.py's request path it times each step and writes their percentiles."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys, uvloop
from bench.probe import install
install(sys.argv[1])
from bench.servicer_cost import run
uvloop.run(run(203, 16, 1.0, max_batch=8))  # the last batch waits for its timer
"""


def test_the_probe_times_each_step_of_the_request_path(tmp_path: Path) -> None:
    out = tmp_path / "probe.json"
    subprocess.run([sys.executable, "-c", SCRIPT, str(out)], cwd=ROOT, check=True, timeout=120)
    steps = json.loads(out.read_text())
    assert set(steps) == {"body", "timer late", "backend call"}
    assert steps["body"]["n"] == 203  # one body a request
    assert 203 / 8 <= steps["backend call"]["n"] < 203  # one call a batch
    for name, p in steps.items():
        assert p["p10"] <= p["p50"] <= p["p90"], name
        if name != "timer late":  # a timer may run early (extproc/runtime/batcher.py)
            assert p["p10"] >= 0, name
