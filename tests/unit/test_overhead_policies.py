"""bench/overhead.py's policy for each `--mode` is one MLProxy accepts, with what it says."""

from __future__ import annotations

import math

import pytest

from bench.httpload import LoadResult
from bench.overhead import Row, _parser, _policies, round_ratios, summary
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


def _row(c: int, name: str, ok: int, elapsed: float, extproc_cpu: float | None) -> Row:
    cpu = {"envoy": 100.0} if extproc_cpu is None else {"envoy": 100.0, "ext_proc": extproc_cpu}
    return (c, name, LoadResult(latencies=[0.01] * ok, elapsed=elapsed), 1.0, cpu)


def _round(c: int, direct: int, floor_cpu: float, mlproxy: tuple[int, float]) -> dict[str, Row]:
    return {
        "direct": _row(c, "direct", direct, 1.0, None),
        "noop ext_proc": _row(c, "noop ext_proc", 600, 1.0, floor_cpu),
        "mlproxy": _row(c, "mlproxy", mlproxy[0], 1.0, mlproxy[1]),
    }


def test_round_ratios_are_of_the_same_rounds_floor_and_direct() -> None:
    ratios = round_ratios(_round(64, 1000, 400.0, (450, 560.0)))
    assert set(ratios) == {"noop ext_proc", "mlproxy"}
    assert ratios["noop ext_proc"] == pytest.approx((1.0, 0.6))
    assert ratios["mlproxy"] == pytest.approx((1.4, 0.45))


def test_a_floor_or_direct_that_served_nothing_gives_nan_not_a_crash() -> None:
    ratios = round_ratios(_round(64, 0, 0.0, (450, 560.0)))
    assert all(math.isnan(v) for v in ratios["mlproxy"])


def test_summary_lists_each_round_and_the_median() -> None:
    rounds = [
        round_ratios(_round(64, 1000, 400.0, (500, 520.0))),  # x1.30, 0.50
        round_ratios(_round(64, 2000, 500.0, (600, 800.0))),  # x1.60, 0.30
        round_ratios(_round(64, 1000, 400.0, (400, 560.0))),  # x1.40, 0.40
    ]
    lines = summary(64, rounds)
    (line,) = [x for x in lines if ", mlproxy," in x]
    assert line == (
        "concurrency 64, mlproxy, 3 rounds: ext_proc CPU x1.30, 1.60, 1.40 of the noop floor "
        "(median 1.40); throughput x0.50, 0.30, 0.40 of direct (median 0.40)"
    )
    assert len(lines) == 2  # the noop's own line too


def test_rounds_is_an_option_with_one_by_default() -> None:
    assert _parser().parse_args([]).rounds == 1
    assert _parser().parse_args(["--rounds", "3"]).rounds == 3


@pytest.mark.parametrize("rounds", ["0", "-2", "two"])
def test_rounds_below_one_is_refused_with_the_options_name(
    rounds: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        _parser().parse_args(["--rounds", rounds])
    assert exited.value.code == 2
    assert "--rounds" in capsys.readouterr().err


def test_with_the_lean_batcher_mlproxy_is_also_given_against_it() -> None:
    rounds = []
    for direct, floor, lean, mlproxy in [
        (1000, 400.0, (500, 400.0), (400, 600.0)),  # x1.50 its CPU, 0.80 its throughput
        (1000, 400.0, (500, 480.0), (450, 576.0)),  # x1.20, 0.90
    ]:
        results = _round(64, direct, floor, mlproxy)
        results["lean batcher"] = _row(64, "lean batcher", lean[0], 1.0, lean[1])
        rounds.append(round_ratios(results))
    (line,) = [x for x in summary(64, rounds) if "against the lean" in x]
    assert line == (
        "concurrency 64, mlproxy against the lean batcher: ext_proc CPU x1.50, 1.20 "
        "(median 1.35); throughput x0.80, 0.90 (median 0.85)"
    )


def test_a_lean_batcher_that_served_nothing_does_not_lose_the_runs_figures() -> None:
    results = _round(64, 1000, 400.0, (450, 560.0))
    results["lean batcher"] = _row(64, "lean batcher", 0, 1.0, 0.0)
    lines = summary(64, [round_ratios(results)])
    (line,) = [x for x in lines if "against the lean" in x]
    assert "CPU xnan" in line and "throughput xnan" in line
    (own,) = [x for x in lines if ", mlproxy," in x]
    assert "x1.40 of the noop floor" in own
