"""extproc/adapters/series.py: what /metrics shows is prometheus_client's, and a scrape during
steps reads whole, consistent series."""

from __future__ import annotations

import math
import random
import sys
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from extproc.adapters.series import FastCounter, FastGauge, FastHistogram

BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.1, 1, 30)


def exposition(registry: CollectorRegistry) -> list[str]:
    """The text format, without prometheus_client's `_created` samples."""
    return [
        line for line in generate_latest(registry).decode().splitlines() if "_created" not in line
    ]


def test_the_same_steps_show_as_prometheus_client_shows_them() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fc = FastCounter("m_requests", "Requests.", ["policy", "outcome"], registry=ours)
    pc = Counter("m_requests", "Requests.", ["policy", "outcome"], registry=theirs)
    fg = FastGauge("m_depth", "Depth.", ["policy"], registry=ours)
    pg = Gauge("m_depth", "Depth.", ["policy"], registry=theirs)
    fh = FastHistogram("m_wait_seconds", "Wait.", ["policy"], buckets=BUCKETS, registry=ours)
    ph = Histogram("m_wait_seconds", "Wait.", ["policy"], buckets=BUCKETS, registry=theirs)
    fu = FastGauge("m_streams", "Streams.", registry=ours)
    pu = Gauge("m_streams", "Streams.", registry=theirs)
    pc.labels("a", "ok")  # (theirs shows a labelled series once made, ours too)
    fc.labels("a", "ok")
    # before any step: an unlabelled metric shows its one series at 0, labelled ones none
    assert exposition(ours) == exposition(theirs)
    rng = random.Random(7)
    # bounds themselves (le is inclusive), values between and beyond them, zero, negatives
    values = [*BUCKETS, 0.0, -0.5, 31.0, 1e9] + [rng.uniform(0, 2) for _ in range(200)]
    for v in values:
        policy = rng.choice(["a", "b"])
        outcome = rng.choice(["ok", "bad_request"])
        for c in (fc, pc):
            c.labels(policy, outcome).inc()
        for h in (fh, ph):
            h.labels(policy).observe(v)
        delta = rng.choice([1, -1, 2])
        for g in (fg, pg):
            g.labels(policy).inc(delta)
        for u in (fu, pu):
            u.inc(delta)
    for g in (fg, pg):
        g.labels("c").set(0.25)
        g.remove("c")
        g.labels("d").set(0.004)
    fh.labels("empty")  # a series made and never stepped shows zeros, as theirs does
    ph.labels("empty")
    for h in (fh, ph):  # a NaN is in no bucket nor the count, and the sum is NaN for good
        h.labels("nan").observe(0.003)
        h.labels("nan").observe(math.nan)
        h.labels("nan").observe(0.0005)
    assert exposition(ours) == exposition(theirs)


def test_counters_refuse_a_negative_step_and_labels_must_match() -> None:
    c = FastCounter("m_total_things", "Things.", ["policy"])
    with pytest.raises(ValueError):
        c.labels("p").inc(-1)
    with pytest.raises(ValueError):
        c.labels("p", "extra")
    with pytest.raises(KeyError):
        c.remove("never")


def test_a_scrape_while_the_loop_steps_reads_whole_series() -> None:
    """/metrics is read from another thread than the one that steps: each histogram read has
    cumulative buckets whose +Inf bucket is its count, and no series is lost or torn."""
    registry = CollectorRegistry()
    h = FastHistogram("m_seconds", "Seconds.", ["policy"], buckets=BUCKETS, registry=registry)
    c = FastCounter("m_steps", "Steps.", ["policy"], registry=registry)
    stop = threading.Event()
    problems: list[str] = []
    reads = 0

    def scrape() -> None:
        try:
            read_all()
        except Exception as err:  # a torn read raises here: the test must see it
            problems.append(repr(err))

    def read_all() -> None:
        nonlocal reads
        while not stop.is_set():
            text = generate_latest(registry).decode()
            reads += 1
            for family in text_string_to_metric_families(text):
                if family.name != "m_seconds":
                    continue
                by_series: dict[str, list[float]] = {}
                counts: dict[str, float] = {}
                for sample in family.samples:
                    policy = sample.labels["policy"]
                    if sample.name.endswith("_bucket"):
                        by_series.setdefault(policy, []).append(sample.value)
                    elif sample.name.endswith("_count"):
                        counts[policy] = sample.value
                for policy, buckets in by_series.items():
                    if buckets != sorted(buckets) or buckets[-1] != counts[policy]:
                        problems.append(f"{policy}: {buckets} count {counts[policy]}")

    g = FastGauge("m_churn", "Series made and dropped.", ["key"], registry=registry)
    reader = threading.Thread(target=scrape)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the two threads interleave often
    reader.start()
    try:
        for i in range(60_000):
            policy = f"p{i % 97}"
            h.labels(policy).observe((i % 13) / 1000.0)
            c.labels(policy).inc()
            g.labels(str(i)).set(i)  # series appear and go while the reader iterates
            if i >= 50:
                g.remove(str(i - 50))
    finally:
        stop.set()
        reader.join()
        sys.setswitchinterval(interval)
    assert reads > 0 and problems == []
    final = {f.name: f for f in text_string_to_metric_families(generate_latest(registry).decode())}
    total = sum(s.value for s in final["m_steps"].samples if s.name == "m_steps_total")
    assert total == 60_000
    seconds = [s for s in final["m_seconds"].samples if s.name == "m_seconds_count"]
    assert len(seconds) == 97 and sum(s.value for s in seconds) == 60_000
    assert math.isclose(
        sum(s.value for s in final["m_seconds"].samples if s.name == "m_seconds_sum"),
        sum((i % 13) / 1000.0 for i in range(60_000)),
    )


def test_a_family_without_labels_steps_its_one_series_and_one_with_labels_needs_them() -> None:
    registry = CollectorRegistry()
    streams = FastGauge("streams", "Open streams.", registry=registry)
    streams.inc(2)
    streams.inc(-1)
    assert registry.get_sample_value("streams") == 1
    streams.clear()  # its series goes; the next step starts a new one
    streams.set(5)
    assert registry.get_sample_value("streams") == 5
    by_policy = FastHistogram("wait", "Waits.", ["policy"], buckets=(1,), registry=registry)
    with pytest.raises(ValueError, match="expected labels"):
        by_policy.observe(0.5)
    counter = FastCounter("calls", "Calls.", ["policy"], registry=registry)
    with pytest.raises(ValueError, match="expected labels"):
        counter.inc()
