"""The fixed-capacity and concurrency-limited backend kinds, alone and in the simulator."""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import pytest

from bench.backends import Server, ServerConfig, backend_config, capacity, make_backend
from bench.knative import Service, ServiceConfig
from bench.profiles import Profile
from bench.sim import SimResult, pooled, simulate, sweep
from bench.simulate import main as simulate_main

# 10 ms a call + 1 ms an instance, no noise: results can be reasoned about exactly
FLAT = Profile("flat", a_ms=10, c_ms=1, slo_ms=200, peak_rps=50, noise=0.0)


def test_a_fixed_server_runs_at_most_k_batches_at_once_in_fifo_order() -> None:
    rng = random.Random(5)
    server = Server[int](ServerConfig(workers=3))
    running: dict[int, object] = {}  # item -> its worker
    started: list[int] = []
    arrived = 0
    now = 0.0
    for _ in range(2000):
        now += rng.random()
        if running and rng.random() < 0.45:
            item = rng.choice(sorted(running))
            server.finish(running.pop(item), now)  # type: ignore[arg-type]
        else:
            assert server.refuse(now) is None  # unbounded queue: never refused
            assert server.arrive(arrived, now) == []  # nothing to start up
            arrived += 1
        for worker, item in server.start(now):
            assert item not in running
            running[item] = worker
            started.append(item)
        assert len(running) == server.running <= 3
        assert len({id(w) for w in running.values()}) == len(running)  # one batch a worker
        if server.waiting:
            assert server.running == 3  # nobody waits while a worker is free
    assert started == sorted(started)  # first come, first served
    assert server.refused == 0 and server.cold_starts == 0


def test_busy_worker_seconds_and_utilisation_are_exact() -> None:
    server = Server[str](ServerConfig(workers=2), start=10.0)
    server.arrive("a", 10.0)
    server.arrive("b", 10.5)
    server.arrive("c", 10.5)
    taken = dict((item, w) for w, item in server.start(10.5))  # a and b, c waits
    assert sorted(taken) == ["a", "b"] and list(server.waiting) == ["c"]
    server.account(11.0)
    assert server.busy_seconds == pytest.approx(1.0)  # two workers for 0.5 s
    server.finish(taken["a"], 11.5)
    [(worker, item)] = server.start(11.5)
    assert item == "c"
    server.finish(taken["b"], 12.0)
    server.finish(worker, 13.5)
    # a 1 s, b 1.5 s, c 2 s
    assert server.cost == pytest.approx(4.5)
    assert server.utilisation(14.0) == pytest.approx(4.5 / (2 * 4.0))
    assert server.serving(14.0) == 0


def test_a_limited_server_refuses_with_429_exactly_beyond_its_limit() -> None:
    server = Server[int](ServerConfig(kind="limited", workers=1, limit=3))
    for i in range(3):
        assert server.refuse(0.0) is None
        server.arrive(i, 0.0)
    [(worker, first)] = server.start(0.0)
    assert (first, server.running, len(server.waiting)) == (0, 1, 2)
    assert server.refuse(0.1) == 429  # 3 in the server: the 4th is refused, not queued
    assert len(server.waiting) == 2 and server.refused == 1
    server.finish(worker, 0.2)
    assert server.refuse(0.2) is None  # 2 in the server now
    # the default limit is the workers: no queue at all
    bare = Server[int](ServerConfig(kind="limited", workers=2))
    for i in range(2):
        assert bare.refuse(0.0) is None
        bare.arrive(i, 0.0)
    assert bare.refuse(0.0) == 429


def test_a_fixed_server_with_a_bounded_queue_answers_503_when_it_is_full() -> None:
    server = Server[int](ServerConfig(workers=1, queue_limit=1))
    assert server.refuse(0.0) is None
    server.arrive(0, 0.0)
    server.start(0.0)
    assert server.refuse(0.0) is None  # the worker is busy: one may wait
    server.arrive(1, 0.0)
    assert server.refuse(0.0) == 503
    assert server.refused == 1


def test_configs_and_the_cli_combinations() -> None:
    with pytest.raises(ValueError):
        ServerConfig(workers=0)
    with pytest.raises(ValueError):
        ServerConfig(kind="limited", limit=0)
    with pytest.raises(ValueError):
        backend_config("knative", workers=2)
    with pytest.raises(ValueError):
        backend_config("fixed", limit=2)
    with pytest.raises(ValueError):
        backend_config("limited", queue_limit=2)
    with pytest.raises(ValueError):
        backend_config("serverless")
    fixed = backend_config("fixed", workers=4, overhead_ms=20)
    assert fixed == ServerConfig(workers=4, overhead=0.02)
    assert isinstance(make_backend(fixed), Server)
    assert isinstance(make_backend(backend_config("knative")), Service)
    assert make_backend(ServiceConfig()).refuse(0.0) is None  # Knative's activator queues


def test_capacity_is_workers_times_batch_over_its_service_time() -> None:
    config = ServerConfig(workers=2, overhead=0.01)
    # t(10) = 10 ms overhead + 10 ms + 10 x 1 ms
    assert capacity(FLAT, config, 10) == pytest.approx(2 * 10 / 0.030)
    assert Server[int](config).service_time(FLAT, 10, random.Random(1)) == pytest.approx(0.030)


def test_the_simulator_queues_at_a_fixed_server_and_counts_busy_time() -> None:
    # off: each request alone; 5 ms overhead + 11 ms a call; the second waits for the first
    backend = ServerConfig(workers=1, overhead=0.005)
    r = simulate(
        "steady", FLAT, "off", 1.0, 1, warmup=0.0, backend=backend, times=[0.0, 0.001, 0.1]
    )
    assert r.latencies.tolist() == pytest.approx([0.016, 0.031, 0.016])
    assert r.pod_seconds == pytest.approx(3 * 0.016)
    assert r.duration == pytest.approx(1.0)
    assert r.utilisation == pytest.approx(3 * 0.016 / 1.0)
    assert r.goodput == pytest.approx(3.0)
    assert (r.refused, r.cold_starts) == (0, 0)
    row = r.row()
    assert row["backend"] == "fixed" and row["utilisation_pct"] == pytest.approx(4.8)
    # two workers: nobody waits
    two = simulate(
        "steady",
        FLAT,
        "off",
        1.0,
        1,
        warmup=0.0,
        backend=ServerConfig(workers=2, overhead=0.005),
        times=[0.0, 0.001, 0.1],
    )
    assert two.latencies.tolist() == pytest.approx([0.016, 0.016, 0.016])
    assert two.utilisation == pytest.approx(3 * 0.016 / 2.0)


def test_a_refused_batch_fails_every_request_in_it_as_the_proxy_does() -> None:
    # static waits 50 ms for a batch; 100 ms overhead makes the first batch run until 0.162 s
    backend = ServerConfig(kind="limited", workers=1, limit=1, overhead=0.1)
    times = [0.0, 0.001, 0.06, 0.061, 0.3]
    r = simulate("steady", FLAT, "static", 1.0, 1, warmup=0.0, backend=backend, times=times)
    # batch 1 = {0, 0.001} sent at 0.05, ends at 0.05 + 0.1 + 0.012
    assert r.latencies[:2].tolist() == pytest.approx([0.162, 0.161])
    # batch 2 = {0.06, 0.061} sent at 0.11 while batch 1 runs: 429, both requests fail
    assert np.isinf(r.latencies[2:4]).all()
    assert (r.refused, r.refused_batches) == (2, 1)
    # the last one finds the server free
    assert r.latencies[4] == pytest.approx(0.05 + 0.111)
    assert r.violations_pct == pytest.approx(40.0)
    assert r.goodput == pytest.approx(3.0)
    assert r.row()["refused"] == 2
    assert r.batches == 3  # the proxy sent three; the server ran two
    assert r.pod_seconds == pytest.approx(0.112 + 0.111)


def test_knative_keeps_its_columns_and_gains_goodput_only() -> None:
    r = simulate("steady", FLAT, "off", 1.0, 1, warmup=0.0, times=[0.0, 0.5])
    row = r.row()
    assert "utilisation_pct" not in row and "refused" not in row
    assert row["goodput_rps"] == pytest.approx(2.0)
    assert math.isnan(r.utilisation)


def test_goodput_and_utilisation_on_a_hand_made_result() -> None:
    def result(latencies: list[float], window: float) -> SimResult:
        return SimResult(
            trace="t",
            profile="flat",
            mode="static",
            duration=window + 1.0,  # a drain after the trace: not goodput's denominator
            requests=len(latencies),
            latencies=np.asarray(latencies),
            arrivals=np.zeros(len(latencies)),
            slo=0.2,
            pod_seconds=3.0,
            cold_starts=0,
            batches=1,
            instances=len(latencies),
            window=window,
            workers=2,
        )

    a = result([0.1, 0.2, 0.3, math.inf, 0.05], 2.0)
    assert a.goodput == pytest.approx(3 / 2.0)  # 0.2 is within the SLO; inf and 0.3 are not
    assert a.utilisation == pytest.approx(3.0 / (2 * 3.0))
    b = result([0.1], 4.0)
    assert pooled([a, b])["goodput_rps"] == pytest.approx(4 / 6.0, abs=0.01)


def test_a_sweep_offers_fractions_of_the_capacity_at_max_batch() -> None:
    backend = ServerConfig(workers=2, overhead=0.01)
    full = capacity(FLAT, backend, 20)
    runs = sweep(FLAT, backend, [0.25, 0.5], modes=("static",), duration=20, warmup=2)
    assert [r.trace for r in runs] == ["steady@0.25", "steady@0.5"]
    for r, load in zip(runs, (0.25, 0.5), strict=True):
        assert r.requests / r.window == pytest.approx(load * full, rel=0.1)  # Poisson
        assert 0 < r.utilisation <= 1


def test_the_cli_sweeps_a_limited_server_and_reports_its_numbers(tmp_path: Path) -> None:
    argv = ["--profiles", "toxic", "--backend", "limited", "--workers", "1", "--limit", "2"]
    argv += ["--overhead-ms", "20", "--loads", "0.5,1.2", "--duration", "10", "--warmup", "2"]
    argv += ["--seeds", "1", "--modes", "static,adaptive", "--no-plots", "--out", str(tmp_path)]
    assert simulate_main(argv) == 0
    text = (tmp_path / "sim.md").read_text()
    assert "limited: 1 worker(s), overhead 20 ms, limit 2 batches" in text
    for title in ("utilisation %", "goodput req/s", "refused req.", "offered req/s"):
        assert title in text
    assert "| 1.2 |" in text
    with pytest.raises(SystemExit):
        simulate_main(["--loads", "0.5", "--out", str(tmp_path)])  # knative: no capacity
    with pytest.raises(SystemExit):
        simulate_main(["--backend", "fixed", "--limit", "3", "--out", str(tmp_path)])
