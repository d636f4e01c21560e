"""The peer benchmark's pure parts (bench/peers): the wire formats and the answer check, the
row, table and verdict, the peers' settings, the peers' model, and stopping a process tree.
The peers themselves (BentoML, MLServer, Ray) are never installed here."""

from __future__ import annotations

import asyncio
import json
import math
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.emulator import predict as emulator_predict
from bench.openloop import OpenLoopResult
from bench.peers import procs
from bench.peers.measure import WIRES, check_answers, errors_by_status, markdown, row, verdict
from bench.peers.models import peer_common
from bench.peers.systems import (
    PINS,
    STACK_CONFIG,
    mlproxy_policy,
    mlserver_files,
    model_env,
    peer_settings,
)
from bench.peers.workload import Workload, arrivals, expected, instance
from bench.profiles import PROFILES
from mlproxy.stack import Child
from mlproxy_kernel.policy import Policy
from tests.waiting import eventually

WORKLOAD = Workload()


def answer(wire: str, prediction: list[float]) -> bytes:
    """What each system answers for one instance, as it writes it."""
    if wire == "kserve-v1":
        return json.dumps({"predictions": [prediction]}).encode()
    if wire == "bentoml":
        return json.dumps([prediction]).encode()
    return json.dumps(
        {
            "model_name": "peer",
            "outputs": [
                {"name": "predictions", "shape": [1, 2], "datatype": "FP64", "data": prediction}
            ],
        }
    ).encode()


@pytest.mark.parametrize("wire", sorted(WIRES))
def test_a_swapped_answer_is_wrong_and_the_right_ones_are_not(wire: str) -> None:
    inputs = [instance(3, i) for i in range(4)]
    bodies = [answer(wire, expected(x)) for x in inputs]
    bodies[0], bodies[2] = bodies[2], bodies[0]  # two clients got each other's answer
    status = np.full(4, 200)
    wrong = check_answers(status, bodies, inputs, WIRES[wire])
    assert wrong.tolist() == [True, False, True, False]


@pytest.mark.parametrize("wire", sorted(WIRES))
def test_a_malformed_answer_is_wrong_and_a_refusal_is_not_an_answer(wire: str) -> None:
    inputs = [instance(1, i) for i in range(3)]
    bodies = [b"not json", answer(wire, expected(inputs[1])), b'{"error": "busy"}']
    wrong = check_answers(np.array([200, 200, 503]), bodies, inputs, WIRES[wire])
    assert wrong.tolist() == [True, False, False]


@pytest.mark.parametrize("wire", sorted(WIRES))
def test_each_wire_sends_the_instance(wire: str) -> None:
    x = instance(2, 5)
    body = json.loads(WIRES[wire].body(x))
    sent = body["inputs"][0]["data"] if wire == "v2" else body["instances"][0]
    assert sent == x


def test_instances_are_distinct_across_runs_and_their_answers_exact() -> None:
    seen = {tuple(expected(instance(run, i))) for run in range(3) for i in range(500)}
    assert len(seen) == 1500
    x = instance(7, 123)
    assert len(x) == 8
    # quarters: the sum is exact in any order
    assert math.fsum(x) == sum(reversed(x)) == expected(x)[0]


def test_the_peers_model_answers_and_times_as_the_emulator() -> None:
    rng = random.Random(5)
    for _ in range(100):
        x = [rng.uniform(-100, 100) for _ in range(8)]
        assert peer_common.predict(x) == emulator_predict(x)
    profile = PROFILES["fixed-20-2"]
    for size in (1, 7, 64):
        a, b = random.Random(size), random.Random(size)
        ours = [peer_common.batch_seconds(size, 20, 2, profile.noise, a) for _ in range(50)]
        assert ours == [profile.sample(size, b) for _ in range(50)]


def test_the_peers_model_runs_one_batch_at_a_time(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    running = [0]
    most = [0]
    yield_now = asyncio.sleep

    async def sleep(seconds: float) -> None:
        running[0] += 1
        most[0] = max(most[0], running[0])
        for _ in range(3):  # let the other batches try to start meanwhile
            await yield_now(0)
        running[0] -= 1

    monkeypatch.setenv("PEER_BATCH_LOG", str(tmp_path / "batches.log"))
    model = peer_common.PeerModel()
    monkeypatch.setattr(peer_common.asyncio, "sleep", sleep)

    async def main() -> list[list[list[float]]]:
        batches = [[instance(0, 10 * k + j) for j in range(k + 1)] for k in range(5)]
        return list(await asyncio.gather(*(model.run(b) for b in batches)))

    try:
        out = asyncio.run(main())
    finally:
        model.close()
    assert most[0] == 1
    assert out == [[expected(instance(0, 10 * k + j)) for j in range(k + 1)] for k in range(5)]
    sizes = [
        int(line.split()[1]) for line in (tmp_path / "batches.log").read_text().split("\n") if line
    ]
    assert sorted(sizes) == [1, 2, 3, 4, 5]


def load(latency_ms: list[float], status: list[int], scheduled: list[float]) -> OpenLoopResult:
    n = len(status)
    return OpenLoopResult(
        started=100.0,
        scheduled=np.asarray(scheduled, float),
        send_error=np.zeros(n),
        latency=np.asarray(latency_ms, float) / 1000,
        status=np.asarray(status, np.int32),
        bodies=[b""] * n,
        headers=[{} for _ in range(n)],
        connections=1,
    )


def test_a_row_counts_misses_late_errors_and_wrong_answers_in_the_window_only() -> None:
    w = Workload(duration=10.0, warmup=2.0)
    result = load(
        # warm-up (ignored), then: on time, late, 503, wrong, on time, on time, timed out
        [900, 10, 151, 5, 20, 149, 150, math.nan],
        [200, 200, 200, 503, 200, 200, 200, 0],
        [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 11.9, 11.99],
    )
    wrong = np.array([False, False, False, False, True, False, False, False])
    r = row("x", 1.0, result, wrong, w, np.array([2.0, 4.0]))
    assert r["requests"] == 7
    assert r["violations_pct"] == pytest.approx(100 * 4 / 7, abs=0.01)
    assert r["goodput_rps"] == pytest.approx(0.3)  # 3 within the SLA in 10 s
    assert r["wrong"] == 1
    assert r["errors"] == "503: 1, none: 1"
    assert r["mean_batch"] == 3.0
    assert r["p50_ms"] == pytest.approx(149.5)  # of the 4 good 200s: 10, 149, 150, 151


def test_errors_by_status() -> None:
    assert errors_by_status(np.array([200, 200])) == "-"
    assert errors_by_status(np.array([503, 0, 503, 429, 200])) == "429: 1, 503: 2, none: 1"


def rows_of(violations: dict[tuple[str, float], float], wrong: int = 0) -> list[dict[str, Any]]:
    out = []
    for (system, rate), v in violations.items():
        out.append(
            {
                "system": system,
                "rate": rate,
                "requests": 100,
                "offered_rps": rate,
                "violations_pct": v,
                "goodput_rps": rate * (1 - v / 100),
                "p50_ms": 50.0,
                "p99_ms": math.nan,
                "mean_batch": math.nan,
                "errors": "-",
                "wrong": wrong if system == "ray" else 0,
            }
        )
    return out


def test_the_verdict_names_every_rate_where_mlproxy_is_not_ahead() -> None:
    rows = rows_of(
        {
            ("mlproxy-adaptive", 40): 0.0,
            ("mlproxy-static", 40): 0.0,
            ("bentoml", 40): 0.0,
            ("ray", 40): 1.0,
            ("mlproxy-adaptive", 300): 90.0,
            ("mlproxy-static", 300): 30.0,
            ("bentoml", 300): 55.0,
            ("ray", 300): 90.0,  # level with adaptive: not ahead either
        },
        wrong=2,
    )
    lines = verdict(rows)
    assert lines[0].startswith("- mlproxy-adaptive is NOT ahead")
    assert "bentoml at 300 req/s (90% against 55%)" in lines[0]
    assert "ray at 300 req/s (90% against 90%)" in lines[0]
    assert "(both at 0% violations: bentoml at 40 req/s)" in lines[0]  # level, not behind
    assert "bentoml at 40 req/s (" not in lines[0]
    assert lines[1] == (
        "- mlproxy-static is ahead of every peer at every rate on SLA attainment "
        "(both at 0% violations: bentoml at 40 req/s)"
    )
    assert lines[2] == "- wrong answers: mlproxy-adaptive 0, mlproxy-static 0, bentoml 0, ray 4"


def test_the_table_has_a_line_per_system_and_rate_by_rate() -> None:
    rows = rows_of(
        {
            ("mlproxy-adaptive", 300): 1.0,
            ("bentoml", 300): 2.0,
            ("mlproxy-adaptive", 40): 0.0,
            ("bentoml", 40): 0.5,
        }
    )
    lines = markdown(rows).splitlines()
    assert lines[0].startswith("| system | rate req/s |")
    assert [line.split(" | ")[0:2] for line in lines[2:]] == [
        ["| mlproxy-adaptive", "40"],
        ["| bentoml", "40"],
        ["| mlproxy-adaptive", "300"],
        ["| bentoml", "300"],
    ]
    assert lines[2].split(" | ")[6] == "-"  # p99 unknown


def test_arrivals_are_poisson_at_the_rate_and_the_same_for_every_system() -> None:
    times = arrivals(300.0, 25.0, 1)
    assert times == arrivals(300.0, 25.0, 1) and times != arrivals(300.0, 25.0, 2)
    assert times == sorted(times) and times[0] >= 0 and times[-1] < 25.0
    assert len(times) / 25.0 == pytest.approx(300.0, rel=0.05)
    gaps = np.diff(times)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, rel=0.1)  # exponential


def test_peer_settings_follow_the_sla_as_the_readme_says() -> None:
    s = peer_settings(WORKLOAD)
    assert (s.max_batch, s.wait_ms, s.max_latency_ms, s.max_ongoing) == (64, 37.5, 150, 64)
    assert peer_settings(WORKLOAD, wait_ms=60).wait_ms == 60
    files = mlserver_files(s, 2001, 2002, 2003)
    assert files["settings.json"] == {
        "host": "127.0.0.1",
        "http_port": 2001,
        "grpc_port": 2002,
        "metrics_port": 2003,
        "debug": False,
    }
    model = files["model-settings.json"]
    assert model["max_batch_size"] == 64 and model["max_batch_time"] == pytest.approx(0.0375)
    assert model["implementation"] == "mlserver_runtime.PeerRuntime"
    env = model_env(WORKLOAD, s, Path("/tmp/b.log"))
    assert (env["PEER_A_MS"], env["PEER_C_MS"], env["PEER_NOISE"]) == ("20", "2", "0.1")
    assert env["PEER_WAIT_MS"] == "37.5" and env["PEER_MAX_LATENCY_MS"] == "150"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0" and env["BENTOML_DO_NOT_TRACK"] == "True"


def test_every_peer_requirement_is_bounded() -> None:
    for name, reqs in PINS.items():
        for req in reqs:
            assert ">=" in req and ",<" in req, (name, req)


def test_the_mlproxy_policies_are_the_issues() -> None:
    path = "/v1/models/peers-adaptive:predict"
    adaptive = Policy.model_validate(
        {"name": "a", **mlproxy_policy("mlproxy-adaptive", path, "http://127.0.0.1:1", WORKLOAD)}
    )
    assert adaptive.sla.latency_ms == 150 and adaptive.sla.percentile == 99
    assert adaptive.batching.mode == "adaptive" and adaptive.batching.max_batch_size == 64
    static = Policy.model_validate(
        {"name": "s", **mlproxy_policy("mlproxy-static", path, "http://127.0.0.1:1", WORKLOAD)}
    )
    b = static.batching
    assert (b.mode, b.max_in_flight, b.max_wait_ms, b.max_batch_size) == ("static", 1, 0.5, 64)
    with pytest.raises(ValueError, match="unknown MLProxy row"):
        mlproxy_policy("mlproxy-aimd", path, "http://127.0.0.1:1", WORKLOAD)


def test_stopping_a_peer_stops_its_whole_tree(tmp_path: Path) -> None:
    # a child, a grandchild, and an orphan whose parent exited (moved out of the tree)
    script = "(sleep 120 &); sleep 120 & sleep 120"
    child = Child("tree", ["sh", "-c", script], tmp_path / "tree.log")
    child.start()
    assert child.proc is not None
    root = child.proc.pid
    eventually(lambda: len(procs.family(root)) >= 4, 30, "sh and its three sleeps started")
    members = procs.family(root)
    assert len(members) == 4, members  # sh and three sleeps
    assert procs.stop_tree(child, timeout=10, grace=5) == set()
    assert procs.alive(members) == set()


def test_cpu_seconds_counts_a_family_s_cpu_time(tmp_path: Path) -> None:
    spin = (
        "import os, time\n"
        "if os.fork() == 0:\n"  # the CPU time is the child's, the root's is small
        "    while time.process_time() < 0.3: pass\n"
        "    print('spun', flush=True)\n"
        "    time.sleep(120)\n"  # both stay, until stopped
        "time.sleep(120)\n"
    )
    child = Child("spin", [sys.executable, "-c", spin], tmp_path / "spin.log")
    child.ready = lambda: "spun" in child.log_path.read_text()
    child.start()
    try:
        child.wait_ready(timeout=60)
        assert child.proc is not None
        assert procs.cpu_seconds([child.proc.pid]) >= 0.3
    finally:
        procs.stop_tree(child, timeout=10)


def test_family_reads_the_process_table() -> None:
    table = {
        10: (1, 10, "S"),  # the root, leading its session
        11: (10, 10, "S"),
        12: (11, 10, "S"),
        13: (1, 10, "S"),  # an orphan of the session
        14: (12, 99, "S"),  # a descendant in a session of its own
        20: (1, 20, "S"),  # someone else
    }
    assert procs.family(10, table) == {10, 11, 12, 13, 14}
    assert sys.platform != "linux" or procs.family(1 << 30) == set()


def test_mlproxy_rows_run_the_fleet_tuner_on_the_production_clock() -> None:
    """The peer benchmark plays its arrivals in real time: the tuner in its stack runs as it
    does in production, not on `mlproxy bench`'s compressed clock (a hold of 12 s at 5x)."""
    assert STACK_CONFIG.tuner_interval == 5.0
    assert STACK_CONFIG.tuner_hold == 60.0
    assert STACK_CONFIG.stats_window == 60.0
    assert STACK_CONFIG.rate_window == 2.0  # and ext_proc's arrival rate as in production
