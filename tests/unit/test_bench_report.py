"""The real-stack benchmark's accounting over the emulator's series, and the shared tables."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from bench.real import CaseResult
from bench.report import reductions, summary, verdict


def _case(ticks: list[list[float]], state: dict[str, Any], start: float, end: float) -> CaseResult:
    # only the emulator's series and the window matter here
    return CaseResult(
        profile=None,  # type: ignore[arg-type]
        trace="steady",
        mode="off",
        config=None,  # type: ignore[arg-type]
        warmup_s=0.0,
        load=None,  # type: ignore[arg-type]
        series={"ticks": {"rows": ticks}, "batches": {"rows": []}, "state": state},
        sim=None,  # type: ignore[arg-type]
        wrong=0,
        measured=np.zeros(0, dtype=bool),
        start=start,
        end=end,
    )


def _state(t: float, pods: int, pod_s: float, cold: int) -> dict[str, Any]:
    return {
        "time": t,
        "ready_pods": pods,
        "starting_pods": 0,
        "waiting": 0,
        "running": 0,
        "pod_seconds": pod_s,
        "cold_starts": cold,
    }


def test_cost_and_cold_starts_count_exactly_the_window_up_to_the_last_state() -> None:
    # one pod from 0, a second ready at 2 (cold start asked at 1.5); ticks at 0, 1, 2
    ticks = [[0, 1, 0, 0, 0, 0.0, 0], [1, 1, 0, 0, 0, 1.0, 0], [2, 2, 0, 0, 0, 2.0, 1]]
    late_state = _state(3.0, 2, 4.0, 1)  # asked after the run: 2 pods for the last second
    case = _case(ticks, late_state, start=0.5, end=2.5)
    assert case.pod_seconds() == pytest.approx(3.0 - 0.5)  # 2.0 + 2 * 0.5 at 2.5, minus 0.5
    assert case.cold_starts() == 1
    # without the state taken after the last tick, the end of the window would be lost
    no_state = _case(ticks, {**late_state, "time": 1.5}, start=0.5, end=2.5)
    assert no_state.pod_seconds() == pytest.approx(2.0 - 0.5)


def test_tables_compare_adaptive_with_off_aimd_and_static() -> None:
    rows = [
        {"profile": "toxic", "trace": "steady", "mode": m, "cost_pod_s": c, "sla_violations_pct": v}
        for m, c, v in (
            ("off", 100.0, 4.0),
            ("static", 40.0, 0.0),
            ("aimd", 50.0, 1.0),
            ("adaptive", 40.0, 0.5),
        )
    ]
    by_mode = {r["mode"]: r for r in rows}
    assert reductions(by_mode) == pytest.approx({"cost": 60.0, "violations": 87.5})
    assert verdict(by_mode) == "viol. fewer vs aimd, viol. MORE vs static, cost not higher vs aimd"
    table = summary(rows, with_verdict=True).splitlines()
    assert table[2].startswith("| toxic | steady | 100 | 40 | 50 | 40 | 4 | 0 | 1 | 0.5 | -60.0% |")
    assert table[2].endswith("| -87.5% | " + verdict(by_mode) + " |")
