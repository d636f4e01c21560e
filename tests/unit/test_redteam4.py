"""Red team 4, pure parts: fleet member signatures against a Redis writer without the fleet
token (copied records, other spellings of a signed address, junk signatures, floods of
records) and what it can still make a replica log."""

from __future__ import annotations

import math
import random
import time
import tracemalloc
from pathlib import Path

import pytest

from controlplane.domain.tuner import tune
from extproc.adapters.metrics import PrometheusMetrics
from extproc.adapters.peers import (
    MAX_MEMBER_WARNINGS,
    Peering,
    PeerSettings,
    check_member,
    sign_member,
)
from extproc.core.clock import FakeClock
from extproc.runtime.executor import BatchExecutor
from extproc.runtime.pool import BatcherPool
from mlproxy_kernel.batching import Rule
from mlproxy_kernel.estimator import LatencyEstimator
from mlproxy_kernel.policy import Policy, Router, Tuning
from mlproxy_kernel.replica import PolicyStats
from mlproxy_kernel.rules import AdaptiveRule, rule_for
from tests.fakes import FakeBackend, RecordingMetrics
from tests.unit.test_rules import _poisson, _simulate

TOKEN = b"red-team-4 fleet token, 16+ bytes"
SELF = "127.0.0.1:7001"
NOW = 1_800_000_000.0


def peering(tmp_path: Path) -> tuple[Peering, PrometheusMetrics]:
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN)
    settings = PeerSettings.build(7001, str(token_file), "127.0.0.1")
    metrics = PrometheusMetrics()
    return Peering(settings, Router([]), metrics, 1 << 20), metrics


def rejected(metrics: PrometheusMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "mlproxy_peer_members_rejected_total", {"reason": reason}
    )
    return value or 0.0


@pytest.mark.parametrize(
    "spelling",
    [
        "127.0.0.1:07002",  # a port with a leading zero: the same canonical member address
        "127.0.0.1:007002",
    ],
)
def test_a_genuine_signature_does_not_cover_another_spelling_of_its_address(
    tmp_path: Path, spelling: str
) -> None:
    """Held: the signature covers the address as written, and a replica signs its canonical
    one; another spelling that canonicalises to the same member (or to another) is refused,
    so one signed record can never stand for a second entry or another address."""
    p, metrics = peering(tmp_path)
    genuine = sign_member(TOKEN, "a", "127.0.0.1:7002", time.time())
    p.update([("a", spelling, genuine), ("b", spelling, genuine)])
    assert p.members == (SELF,)
    assert rejected(metrics, "signature") == 2
    # the genuine spelling, for the id it was signed for only
    p.update([("a", "127.0.0.1:7002", genuine), ("a\ufffd", "127.0.0.1:7002", genuine)])
    assert list(p.members) == [SELF, "127.0.0.1:7002"]
    assert rejected(metrics, "signature") == 3
    for six in ("[0:0:0:0:0:0:0:1]:7002", "[::1]:07002"):
        good = sign_member(TOKEN, "v6", "[::1]:7002", NOW)
        assert check_member(TOKEN, "v6", six, good, NOW) == "signature"


@pytest.mark.parametrize(
    "junk",
    [
        "9" * 16 + "." + "0" * 64,  # a stamp far in the future: malformed or refused, no error
        "1" * 5000,
        "1." + "a" * 10_000_000,  # a 10 MB signature: refused by its length, not hashed
        {"stamp": 1},
        float("nan"),
    ],
    ids=["future-stamp", "digits", "huge", "object", "nan"],
)
def test_junk_signatures_are_refused_quickly_and_never_crash_the_update(
    tmp_path: Path, junk: object
) -> None:
    """Held: whatever JSON a Redis writer puts in `peer_signature` is refused by reason."""
    p, metrics = peering(tmp_path)
    start = time.perf_counter()
    p.update([("j", "127.0.0.1:7002", junk)])
    assert time.perf_counter() - start < 0.5
    assert p.members == (SELF,)
    assert sum(rejected(metrics, r) for r in ("malformed", "signature", "future")) == 1


def test_a_redis_writer_that_renames_its_records_every_beat_cannot_flood_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Finding: refused records were logged once per record id, but up to MAX_MEMBER_WARNINGS
    per read of the records, and a read is every heartbeat (2 s): a Redis writer that wrote
    16 records under new ids before each beat (a few kB) made every replica log 8 warnings
    a second (each ~450 characters, about 300 MB a day per replica) for as long as it liked.
    Fixed: the per-id warnings share one budget of MAX_MEMBER_WARNINGS a minute (then the
    throttled summary); every refusal is still counted by reason."""
    p, metrics = peering(tmp_path)
    beats = 30  # a minute of heartbeats
    with caplog.at_level("WARNING"):
        for beat in range(beats):
            p.update((f"rename-{beat}-{i}", f"127.0.1.{i % 250 + 1}:7002", None) for i in range(20))
    assert p.members == (SELF,)
    assert rejected(metrics, "unsigned") == beats * 20
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) <= MAX_MEMBER_WARNINGS + 1, len(warnings)
    assert any("mlproxy_peer_members_rejected_total" in w for w in warnings)


def test_a_token_rotation_is_still_said_once_per_replica(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The budget does not hide what an operator must see: each replica with another token
    is named once, however many beats pass."""
    p, _ = peering(tmp_path)
    other = b"another fleet token, 16+ bytes"
    with caplog.at_level("WARNING"):
        for _ in range(10):
            p.update(
                (
                    f"r{i}",
                    f"127.0.0.{i + 2}:7002",
                    sign_member(other, f"r{i}", f"127.0.0.{i + 2}:7002", time.time()),
                )
                for i in range(3)
            )
    for i in range(3):
        assert caplog.text.count(f"replica record 'r{i}'") == 1


def _adaptive_policy() -> Policy:
    return Policy.model_validate(
        {
            "name": "m",
            "match": {"path": "/m"},
            "backend": {"url": "http://b/m", "timeout_ms": 5000},
            "sla": {"latency_ms": 150, "percentile": 99},
            "batching": {"mode": "adaptive", "max_batch_size": 64, "max_in_flight": 8},
        }
    )


def _stats(samples: list[tuple[int, float]], rate: float) -> PolicyStats:
    return PolicyStats(
        window_s=60,
        requests=int(rate * 60),
        arrival_rate=rate,
        sla_misses=0,
        batches=len(samples),
        mean_batch_size=8,
        batch_samples=samples,
    )


def _missed_on_a_noisy_four_worker_server(rule: Rule, rate: float) -> float:
    """test_rules' four-worker server (t(b) = 22 + 2b ms, log-normal noise sigma 0.2, batches
    waiting at the server for a free worker), Poisson arrivals due 150 ms after they arrive,
    20 s: the share of requests answered after their deadlines."""
    assert isinstance(rule, AdaptiveRule)
    rng = random.Random(1)
    run = _simulate(
        rule,
        _poisson(rate, 20.0, rng),
        workers=4,
        wait_at_server=True,
        overhead=0.002,
        noise=0.2,
        rng=rng,
    )
    answered = [(r.answered, r.deadline) for r in run.requests if r.answered is not None]
    return sum(at > due for at, due in answered) / len(answered)


def test_fake_replica_records_cannot_make_a_peered_replica_plan_for_a_fleet() -> None:
    """Finding: a Redis writer (the ext_proc Redis user; no fleet token, no control plane
    token) writes records `mlproxy:replica:fake-<n>` whose stats say they take traffic of
    policy m. They are no fleet members (unsigned), but the tuner reads stats from every
    record (it has no fleet token to check them with): its decision sets tuning.replicas to
    51, and each replica's adaptive rule then took the spread of its batch times for other
    replicas' load, not noise, cut its in-flight limit on noise and missed deadlines the
    single honest replica meets (2% against 0.1%). Fixed where the signatures can be
    checked: a peered replica bounds the tuner's count by its signed members
    (`AdaptiveRule.bound_fleet`, set by the batcher pool from the peering's member list)."""
    rng = random.Random(5)
    honest = _stats(
        [(b, (22 + 2 * b) * math.exp(rng.gauss(0, 0.2))) for b in range(1, 33) for _ in (0, 1)],
        400.0,
    )
    forged = [_stats([], 1.0) for _ in range(50)]  # no samples: only "I take traffic too"
    base = _adaptive_policy()
    decision = tune(base, [honest, *forged], now=1000.0)
    assert decision is not None
    assert decision.tuning.replicas == 51  # the tuner cannot tell: the replicas must
    tuned = base.model_copy(update={"tuning": decision.tuning})
    clean = tune(base, [honest], now=1000.0)
    assert clean is not None
    baseline = _missed_on_a_noisy_four_worker_server(
        rule_for(base.model_copy(update={"tuning": clean.tuning})), 400.0
    )
    assert baseline <= 0.005  # the honest fleet of one meets its p99 with room
    rule = rule_for(tuned)
    assert isinstance(rule, AdaptiveRule) and rule.fleet == 51
    rule.bound_fleet(1)  # the one signed member: itself
    assert rule.fleet == 1
    missed = _missed_on_a_noisy_four_worker_server(rule, 400.0)
    assert missed <= 0.01, missed


def test_the_fleet_bound_follows_the_signed_members_and_never_raises_the_tuners_count(
    tmp_path: Path,
) -> None:
    """The peering tells the batcher pool its member count whenever it changes; the pool
    bounds every adaptive rule's fleet by it, those it keeps and those it builds later. A
    bound above the tuner's count leaves the count as it is; no bound (None) restores it."""
    p, _ = peering(tmp_path)
    clock = FakeClock()
    metrics = RecordingMetrics()
    pool = BatcherPool(BatchExecutor(FakeBackend(), metrics, clock), clock, metrics)
    pool.set_fleet_bound(len(p.members))
    p.on_members = pool.set_fleet_bound
    told = _adaptive_policy().model_copy(update={"tuning": Tuning(replicas=5)})
    first = pool.rule(("m", "u", "a"), told)
    assert isinstance(first, AdaptiveRule) and first.fleet == 1  # alone in the fleet
    now = time.time()
    others = [(f"r{i}", f"127.0.0.1:{7002 + i}", None) for i in range(3)]
    p.update([(rid, a, sign_member(TOKEN, rid, a, now)) for rid, a, _ in others])
    assert len(p.members) == 4 and first.fleet == 4
    later = pool.rule(("m", "u", "b"), told)
    assert isinstance(later, AdaptiveRule) and later.fleet == 4
    # forged records (unsigned) are no members: the bound stays
    p.update(
        [(rid, a, sign_member(TOKEN, rid, a, now)) for rid, a, _ in others]
        + [(f"fake-{i}", f"127.0.0.1:{7100 + i}", None) for i in range(50)]
    )
    assert len(p.members) == 4 and first.fleet == 4
    nine = [(f"r{i}", f"127.0.0.1:{7002 + i}") for i in range(9)]
    p.update([(rid, a, sign_member(TOKEN, rid, a, now)) for rid, a in nine])
    assert len(p.members) == 10 and first.fleet == later.fleet == 5  # never above the count
    pool.set_fleet_bound(None)
    assert first.fleet == 5


def _missed_when_a_second_batch_runs_at_half_speed(rule: AdaptiveRule, rate: float) -> float:
    """A backend that runs a batch in t(b) = 20 + 2b ms when it is the only one of ours there,
    and in twice that when it is sent while another is running (a model server that splits
    one accelerator between its calls, or one that answers slower on purpose under
    concurrency); the one already running is not slowed. Poisson arrivals at `rate` (seeded)
    for 30 s, due 150 ms after they arrive: the share of requests after the first 2 s
    answered after their deadlines."""
    arrivals = _poisson(rate, 30.0, random.Random(1))
    run = _simulate(rule, arrivals, workers=rule.in_flight_bound, shared=True)
    measured = [r for r in run.requests if r.arrival >= 2.0]
    return sum(not r.met for r in measured) / len(measured)


@pytest.mark.xfail(
    strict=True,
    reason="red team 4: since the latency model stopped learning a failed probe's batches "
    "(c829f87), on a backend that runs a batch sent alongside another at half speed the model "
    "holds the lone-batch time, so at 250 req/s the rule is not 'pressed'; the backlog each "
    "failed probe leaves makes its deadline-held batches tiny (1-3 requests: a batch grows "
    "only while the head request still makes its deadline), throughput falls below the "
    "arrival rate and stays there: 13-17% of requests miss over 30 s (3 seeds), 0% with "
    "max_in_flight 1. Tried (2026-12-03): sending a backlog of more than twice the held batch "
    "in batches of at least the held one (3.0% at 250 req/s, 4.6% at 280), plus planning a "
    "probe's batch at L / (L - 1) of its time (0.0% and 0.01%); with either, the real stack "
    "at 300 req/s collapsed in 5 of 20 runs (batches of 8-9, 15-29% misses) where the rule "
    "as it is did not in 14, each time after the fleet tuner's first change; carrying a "
    "trial across policy versions did not stop it, the cause is not found: reverted "
    "(docs/security.md, Known gaps). Since red team 6 a backlog of more than a full batch and the "
    "held batches of every slot and the next is sent at the largest batch: 6.5% at 250 req/s "
    "and 4.7% at 280, still failing",
)
def test_a_backend_slower_under_concurrency_cannot_collapse_the_rule_into_tiny_batches() -> None:
    """A misbehaving (or accelerator-sharing) backend answers a batch sent while another of
    ours runs at half speed. The in-flight learner's probes fail there, as they should; the
    requests queued meanwhile must not push the rule into batches too small to keep up with
    the arrivals. Requests to the policy that arrive later are other clients' requests."""

    def rule(max_in_flight: int) -> AdaptiveRule:
        return AdaptiveRule(
            LatencyEstimator(percentile=99.0), 64, max_in_flight, 10_000, margin=0.015
        )

    for rate in (250.0, 280.0):
        assert _missed_when_a_second_batch_runs_at_half_speed(rule(1), rate) <= 0.001  # servable
        missed = _missed_when_a_second_batch_runs_at_half_speed(rule(8), rate)
        assert missed <= 0.01, (rate, missed)


def test_refused_records_with_huge_ids_are_not_kept_in_memory(tmp_path: Path) -> None:
    """Finding: the ids of refused records were remembered whole (up to 4096 of them, to log
    each once), and an id is a Redis key name, which may be up to 512 MB: a Redis writer that
    wrote records under new, long key names (with a short TTL, so Redis holds only the
    latest) made every replica keep 4096 of them: 64 MB with 16 kB names, gigabytes with
    longer ones. Fixed: a refused id is remembered by what the log shows of it (its first 64
    characters)."""
    p, metrics = peering(tmp_path)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for beat in range(4):
            records = [(f"{beat}-{i}-" + "x" * 16_000, "127.0.0.1:7002", None) for i in range(1024)]
            p.update(records)
            del records
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert rejected(metrics, "unsigned") == 4 * 1024
    assert kept < 8 << 20, f"{kept / (1 << 20):.0f} MB kept"
