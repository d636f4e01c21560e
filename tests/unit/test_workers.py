"""`mlproxy extproc --workers N`: what sets a worker apart, and the supervisor's merged metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mlproxy.cli import _workers
from mlproxy.workers import MAX_WORKERS, WorkerSlot, merge_metrics, worker_slot


def test_a_worker_slot_sets_its_replica_id_and_peer_port_apart() -> None:
    slot = WorkerSlot(2, 4)
    assert slot.replica_id("pod-a") == "pod-a-w2"
    assert slot.peer_port(7000) == 7002
    assert slot.peer_port(None) is None
    assert slot.peer_advertise("10.0.0.5:7000") == "10.0.0.5:7002"
    assert slot.peer_advertise("[fd00::5]:7000") == "[fd00::5]:7002"
    assert slot.peer_advertise(None) is None


@pytest.mark.parametrize(("index", "count"), [(-1, 2), (2, 2), (0, MAX_WORKERS + 1)])
def test_an_impossible_slot_is_refused(index: int, count: int) -> None:
    with pytest.raises(ValueError):
        WorkerSlot(index, count)


def test_a_worker_learns_its_slot_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("MLPROXY_WORKER_INDEX", raising=False)
    assert worker_slot() is None
    monkeypatch.setenv("MLPROXY_WORKER_INDEX", "1")
    monkeypatch.setenv("MLPROXY_WORKER_COUNT", "3")
    monkeypatch.setenv("MLPROXY_WORKER_DIR", str(tmp_path))
    slot = worker_slot()
    assert slot is not None and (slot.index, slot.count) == (1, 3)
    slot.metrics_served(41234)
    assert (tmp_path / "worker-1.port").read_text() == f"{os.getpid()} 41234"


def test_workers_come_from_the_flag_else_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLPROXY_WORKERS", raising=False)
    assert _workers(None) == 1
    monkeypatch.setenv("MLPROXY_WORKERS", "3")
    assert _workers(None) == 3
    assert _workers(2) == 2
    for bad in ("zero", "0", str(MAX_WORKERS + 1)):
        monkeypatch.setenv("MLPROXY_WORKERS", bad)
        with pytest.raises(ValueError, match=r"MLPROXY_WORKERS|--workers"):
            _workers(None)


def worker_registry(requests: float, version: float) -> str:
    registry = CollectorRegistry()
    c = Counter("mlproxy_requests", "Requests.", ["policy", "outcome"], registry=registry)
    c.labels("demo", "ok").inc(requests)
    Gauge("mlproxy_policy_version", 'Version "quoted"\nand more.', ["policy"], registry=registry)
    registry._names_to_collectors["mlproxy_policy_version"].labels('a"b\\c').set(version)  # type: ignore[attr-defined]
    h = Histogram("mlproxy_batch_size", "Batch.", ["policy"], buckets=(1, 4), registry=registry)
    h.labels("demo").observe(3)
    return generate_latest(registry).decode()


def test_merged_metrics_label_each_sample_with_its_worker_and_keep_families_together() -> None:
    merged = merge_metrics([("0", worker_registry(5, 1)), ("1", worker_registry(7, 2))])
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    requests = {
        (s.labels["worker"], s.name): s.value
        for s in families["mlproxy_requests"].samples
        if s.name == "mlproxy_requests_total"
    }
    assert requests == {("0", "mlproxy_requests_total"): 5, ("1", "mlproxy_requests_total"): 7}
    versions = {s.labels["worker"]: s for s in families["mlproxy_policy_version"].samples}
    assert versions["1"].value == 2 and versions["1"].labels["policy"] == 'a"b\\c'
    assert families["mlproxy_batch_size"].type == "histogram"
    buckets = [s for s in families["mlproxy_batch_size"].samples if s.name.endswith("_bucket")]
    assert {s.labels["worker"] for s in buckets} == {"0", "1"}
    # one HELP and one TYPE per family, whatever the number of workers
    assert merged.count("# TYPE mlproxy_requests_total counter") == 1
    assert merged.count("# HELP mlproxy_policy_version") == 1


def test_workers_need_a_port_they_can_share(tmp_path: Path) -> None:
    policies = tmp_path / "p.json"
    policies.write_text('{"policies": []}')
    done = subprocess.run(
        [
            *(sys.executable, "-m", "mlproxy.cli", "extproc", "--policies", str(policies)),
            *("--port", "0", "--workers", "2"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "--workers shares one gRPC port" in done.stderr


def test_a_scrape_that_is_not_prometheus_text_is_left_out_not_the_others() -> None:
    """Red team 9 (F3): a foreign answer on a dead worker's old port made every merged scrape
    fail."""
    merged = merge_metrics([("0", worker_registry(5, 1)), ("1", "<html>not metrics\n")])
    families = {f.name: f for f in text_string_to_metric_families(merged)}
    assert {s.labels["worker"] for s in families["mlproxy_requests"].samples} == {"0"}


def test_a_port_file_counts_only_for_the_live_process_that_wrote_it(tmp_path: Path) -> None:
    """Red team 9 (F3): the port file of a worker that exited pointed the supervisor at a
    freed port anyone could bind; a file of another pid is not the worker's either."""
    from mlproxy.workers import _metrics_port, _Worker

    worker = _Worker(0, [sys.executable, "-c", "import time; time.sleep(30)"], {})
    worker.start()
    assert worker.proc is not None
    try:
        path = tmp_path / "worker-0.port"
        assert _metrics_port(tmp_path, worker) is None  # not told yet
        path.write_text(f"{worker.proc.pid + 1} 40001")
        assert _metrics_port(tmp_path, worker) is None  # someone else's
        path.write_text(f"{worker.proc.pid} 40001")
        assert _metrics_port(tmp_path, worker) == 40001
        worker.proc.kill()
        worker.proc.wait()
        assert _metrics_port(tmp_path, worker) is None  # exited: its port may be anyone's
    finally:
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait()


def test_a_configuration_no_worker_can_start_with_fails_in_the_supervisor(tmp_path: Path) -> None:
    """Workers that exit at once would be restarted forever: the supervisor checks first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLPROXY_", "REDIS_URL"))}
    done = subprocess.run(
        [sys.executable, "-m", "mlproxy.cli", "extproc", "--port", "50999", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )
    assert done.returncode == 2
    assert "say where policies come from" in done.stderr
    assert "supervising" not in done.stderr
