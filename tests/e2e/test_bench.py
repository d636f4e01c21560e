"""`mlproxy bench` end to end: the real stack (Redis, control plane, ext_proc, Envoy) in front of
the serverless emulator, a short trace replayed open loop in two modes, every answer checked,
the simulator run on the same arrivals, and the report written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.real import main as bench_main
from bench.traces import schedule

pytestmark = pytest.mark.e2e


def load(path: Path) -> dict[str, np.ndarray]:
    """A run's raw results, the file closed (warnings are errors here)."""
    with np.load(path) as raw:
        return dict(raw)


def test_a_short_bench_runs_the_real_stack_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    # 60 s of trace at time scale 20: 3 s per run, after a 1-2.5 s warm-up
    code = bench_main(
        [
            "--profile",
            "toxic",
            "--trace",
            "steady",
            "--mode",
            "off",
            "--mode",
            "adaptive",
            "--duration",
            "60",
            "--warmup",
            "20",
            "--time-scale",
            "20",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    rows = {row["mode"]: row for row in json.loads((out / "results.json").read_text())}
    assert set(rows) == {"off", "adaptive"}
    for mode, row in rows.items():
        assert row["wrong"] == 0 and row["lost"] == 0 and row["errors"] == 0, mode
        assert row["requests"] > 100  # 3 s at 50 req/s
        assert row["cost_pod_s"] > 0 and row["sim_cost_pod_s"] > 0
        assert row["p50_ms"] > 0 and row["sim_p50_ms"] > 0
        # every measured request is in the raw results, with its latency and status
        raw = load(out / "runs" / f"toxic-steady-{mode}.npz")
        measured = raw["scheduled"] >= float(raw["warmup_s"])
        assert int(measured.sum()) == row["requests"]
        assert (raw["status"] == 200).all() and np.isfinite(raw["latency"]).all()
        assert np.isfinite(raw["send_error"]).all()
        # the runner replayed exactly the trace's schedule
        again = schedule("steady", 3.0, 50, 1, float(raw["warmup_s"]))
        assert raw["scheduled"] == pytest.approx(again)
    # the fleet tuner ran on the benchmark's clock (a round every 0.25 s at 20x), and tuned
    # the adaptive policy, on the real stack and in the simulator alike; off is never tuned
    assert rows["off"]["tuner_changes"] == rows["off"]["sim_tuner_changes"] == 0
    assert rows["adaptive"]["tuner_changes"] >= 1 and rows["adaptive"]["sim_tuner_changes"] >= 1
    tuner = json.loads((out / "runs" / "toxic-steady-adaptive.tuner.json").read_text())
    assert len(tuner["real"]) == rows["adaptive"]["tuner_changes"]
    assert len(tuner["sim"]) == rows["adaptive"]["sim_tuner_changes"]
    first = tuner["real"][0]
    assert first["version"] > first["previous_version"] and "margin_ms" in first["changes"]
    # at most one change of a policy per 3 s (a minute of trace time) in a run of 4-5.5 s
    assert rows["adaptive"]["tuner_changes"] <= 2
    assert rows["off"]["mean_batch"] == 1.0  # one request per backend call
    assert rows["adaptive"]["mean_batch"] > 1.0  # 50 req/s, an SLO of 300 ms: it batches
    assert (raw["batch_size"] >= 1).all()  # ext_proc said how big each request's batch was
    report = (out / "report.md").read_text()
    assert "| toxic | steady |" in report and "mlproxy bench --profile toxic" in report
    assert "The fleet tuner ran, scaled: a round every 0.25 s" in report
    assert "tuner changes" in report
    assert (out / "toxic-steady.png").stat().st_size > 10_000
    series = json.loads((out / "runs" / "toxic-steady-adaptive.series.json").read_text())
    assert series["ticks"]["rows"] and series["batches"]["rows"]
    # ext_proc put its start-up objects out of the garbage collector's reach
    assert "start-up objects frozen" in (out / "logs" / "extproc-0.log").read_text()


def test_a_bench_on_a_limited_server_passes_its_429s_to_the_clients(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    # off sends each request alone: 50 req/s at 37 + 1 + 20 ms a call on one worker that
    # admits one batch at a time, so many batches find it busy and get 429
    argv = ["--profile", "toxic", "--trace", "steady", "--mode", "off", "--mode", "adaptive"]
    argv += ["--duration", "60", "--warmup", "20", "--time-scale", "20", "--out", str(out)]
    argv += ["--backend", "limited", "--workers", "1", "--limit", "1", "--overhead-ms", "20"]
    argv += ["--no-plots"]
    assert bench_main(argv) == 0
    rows = {row["mode"]: row for row in json.loads((out / "results.json").read_text())}
    for mode, row in rows.items():
        assert row["wrong"] == 0 and row["lost"] == 0, mode
        assert row["backend"] == "limited" and 0 < row["utilisation_pct"] <= 100.5, mode
        assert row["errors"] == row["refused"], mode  # the only failures are the refusals
        raw = load(out / "runs" / f"toxic-steady-{mode}.npz")
        series = json.loads((out / "runs" / f"toxic-steady-{mode}.series.json").read_text())
        state = series["state"]
        assert state["kind"] == "limited" and state["limit"] == 1
        assert state["cold_starts"] == 0
        if mode == "off":  # one request a batch: each refusal is one client's 429
            assert state["refused_429"] == int((raw["status"] == 429).sum()) > 0
    off = rows["off"]
    assert off["refused"] > 0 and off["sim_goodput_rps"] > 0 and off["goodput_rps"] > 0
    report = (out / "report.md").read_text()
    assert "limited: 1 worker(s), overhead 20 ms, limit 1 batches" in report
    assert "utilisation %" in report and "refused req." in report


def test_bench_without_cases_says_what_to_give() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mlproxy.cli", "bench"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "--suite" in proc.stderr and "--profile" in proc.stderr
