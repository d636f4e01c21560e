"""Adaptive against the best static configuration picked after the fact (issue 13's yardstick).

For each backend kind, offered load and replica count, the simulator (`bench/sim.py`, the
production core) runs `adaptive` and every static configuration of a grid (max batch
8/16/32/64 x max wait 0.5/5/20/50 ms x in-flight 1/2/4) on the same arrivals and the same
backend noise. The best static configuration for that case is chosen after the fact:

- among those that meet the SLA (violations at most 100 - percentile %), the cheapest (backend
  cost: busy worker-seconds, or ready-pod-seconds on Knative); within 2% of that cost, the one
  with the lowest p50;
- if none meets it, the one with the highest goodput (answers within the SLA per second), then
  the fewest violations.

Adaptive is judged against it: SLA attainment and goodput no worse (a tolerance of
`TOLERANCE_PCT` points of violations and 1% of goodput for the noise of one run), cost no
higher (within 2%) where both meet the SLA, and where the costs are within 2%, a p50 no higher.

The workload is issue 13's: t(b) = 20 ms + 2 ms * b (+ `--overhead-ms`, the server's own
per-call cost), SLA 150 ms at p99, one instance per request, Poisson arrivals. Load is a
fraction of the server's SLA capacity (`sla_capacity`): the highest rate at which sending
whenever a worker frees can meet the SLA, k * b / t(b) for the largest b with 2 t(b) <= SLA
(a request may wait for one batch and then ride the next); a Knative service autoscales, so its
rates are the one-worker server's.

With several replicas, `--fleet` says how they share the backend (`bench/sim.py`): `owner`
(the default: one replica batches for the fleet, the others forward to it, `--hop-ms` each
way, as `--peer-port` does), `independent` (each batches its share alone: peering off) or
`budget` (a shared in-flight count). Every mode, static included, runs in the same fleet. The
control plane's fleet tuner runs every `--tuner-every` seconds (0: off), as in production.

    python -m bench.grid --kinds fixed1,fixed4,limited,knative --loads 0.2,0.5,0.8,1,1.2 \
        --replicas 1,3 --fleet owner --duration 40 --out bench/results/grid
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.backends import BackendConfig, ServerConfig
from bench.knative import ServiceConfig
from bench.profiles import Profile
from bench.sim import FLEETS, Fleet, SimResult, simulate
from mlproxy_kernel.policy import Mode, Policy

__all__ = [
    "KINDS",
    "WORKLOAD",
    "Case",
    "best_static",
    "judge",
    "sla_capacity",
    "static_grid",
]

# Issue 13's model server: t(b) = 20 + 2b ms, SLA 150 ms at p99.
WORKLOAD = Profile("fixed-20-2", a_ms=20.0, c_ms=2.0, slo_ms=150.0, peak_rps=300.0)
PERCENTILE = 99.0
MAX_BATCH = 64
TOLERANCE_PCT = 0.1  # violations, percentage points
COST_TIE = 0.02

BATCHES = (8, 16, 32, 64)
WAITS_MS = (0.5, 5.0, 20.0, 50.0)
IN_FLIGHT = (1, 2, 4)


def kinds(overhead: float) -> dict[str, BackendConfig]:
    return {
        "fixed1": ServerConfig(kind="fixed", workers=1, overhead=overhead),
        "fixed4": ServerConfig(kind="fixed", workers=4, overhead=overhead),
        "limited": ServerConfig(kind="limited", workers=1, overhead=overhead, limit=2),
        "knative": ServiceConfig(),
    }


KINDS = tuple(kinds(0.0))


def sla_capacity(profile: Profile, workers: int, overhead: float) -> float:
    """Requests per second a server of `workers` answers within the SLA when it sends as soon
    as a worker frees: k * b / t(b) for the largest b with 2 t(b) <= SLA."""
    slo = profile.slo_ms / 1000.0
    best = 0.0
    for b in range(1, 4097):
        t = overhead + profile.mean(b)
        if 2 * t > slo:
            break
        best = workers * b / t
    return best


def static_grid() -> list[dict[str, Any]]:
    return [
        {"max_batch_size": b, "max_wait_ms": w, "max_in_flight": f}
        for b in BATCHES
        for w in WAITS_MS
        for f in IN_FLIGHT
    ]


def label(batching: dict[str, Any]) -> str:
    if batching.get("mode") == "adaptive":
        return "adaptive"
    return (
        f"static b{batching['max_batch_size']} w{batching['max_wait_ms']:g} "
        f"f{batching['max_in_flight']}"
    )


def policy(
    batching: dict[str, Any],
    profile: Profile = WORKLOAD,
    autoscaled: bool = False,
    replicas: int = 1,
) -> Policy:
    """The policy a user writes for this workload; on Knative, with the autoscaler's target
    (1 concurrent call per pod at 70%); with several replicas, the replica count the fleet
    tuner writes into `tuning` (its steady state)."""
    path = "/v1/models/m:predict"
    backend: dict[str, Any] = {"url": "http://model" + path, "timeout_ms": 60_000}
    if autoscaled:
        backend["autoscaling_target"] = 0.7
    return Policy.model_validate(
        {
            "name": "grid",
            "match": {"path": path},
            "backend": backend,
            "sla": {"latency_ms": profile.slo_ms, "percentile": PERCENTILE},
            "batching": {"max_queue": 1_000_000, **batching},
            "tuning": {"replicas": replicas} if replicas > 1 else None,
        }
    )


ADAPTIVE: dict[str, Any] = {"mode": "adaptive", "max_batch_size": MAX_BATCH}


@dataclass(frozen=True)
class Case:
    kind: str
    load: float
    replicas: int
    rate: float
    fleet: Fleet = "independent"


@dataclass(frozen=True)
class Run:
    duration: float
    warmup: float
    overhead: float
    seed: int
    hop: float
    tuner_every: float | None


def _run(args: tuple[Case, dict[str, Any], Run]) -> dict[str, Any]:
    case, batching, run = args
    duration, warmup, overhead, seed = run.duration, run.warmup, run.overhead, run.seed
    mode: Mode = "adaptive" if batching.get("mode") == "adaptive" else "static"
    body = batching if mode == "adaptive" else {"mode": "static", **batching}
    r: SimResult = simulate(
        "steady",
        WORKLOAD,
        mode,
        duration,
        case.rate,
        seed=seed,
        replicas=case.replicas,
        backend=kinds(overhead)[case.kind],
        warmup=warmup,
        policy=policy(body, autoscaled=case.kind == "knative", replicas=case.replicas),
        fleet=case.fleet,
        hop=run.hop,
        tuner_every=run.tuner_every,
    )
    return {
        "kind": case.kind,
        "replicas": case.replicas,
        "fleet": case.fleet,
        "load": case.load,
        "rate": round(case.rate, 1),
        "config": label(body),
        "violations_pct": round(r.violations_pct, 3),
        "goodput_rps": round(r.goodput, 2),
        "cost": round(r.pod_seconds, 2),
        "p50_ms": round(r.percentile_ms(50), 1),
        "p99_ms": round(r.percentile_ms(99), 1),
        "mean_batch": round(r.mean_batch, 2),
    }


def meets(row: dict[str, Any]) -> bool:
    return bool(row["violations_pct"] <= 100.0 - PERCENTILE)


def best_static(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The best static row of one case, picked after the fact (see the module's doc)."""
    ok = [r for r in rows if meets(r)]
    if ok:
        cheapest = min(r["cost"] for r in ok)
        near = [r for r in ok if r["cost"] <= cheapest * (1 + COST_TIE) + 1e-9]
        return min(near, key=lambda r: (r["p50_ms"], r["cost"]))
    return max(rows, key=lambda r: (r["goodput_rps"], -r["violations_pct"]))


def judge(adaptive: dict[str, Any], best: dict[str, Any]) -> list[str]:
    """Where adaptive loses to `best` (empty: it does not)."""
    lost = []
    if adaptive["violations_pct"] > best["violations_pct"] + TOLERANCE_PCT:
        lost.append(f"violations {adaptive['violations_pct']}% > {best['violations_pct']}%")
    if adaptive["goodput_rps"] < best["goodput_rps"] * 0.99:
        lost.append(f"goodput {adaptive['goodput_rps']} < {best['goodput_rps']}")
    if meets(adaptive) and meets(best):
        if adaptive["cost"] > best["cost"] * (1 + COST_TIE):
            lost.append(f"cost {adaptive['cost']} > {best['cost']}")
        elif (
            abs(adaptive["cost"] - best["cost"]) <= COST_TIE * best["cost"]
            and adaptive["p50_ms"] > best["p50_ms"]
        ):
            lost.append(f"p50 {adaptive['p50_ms']} > {best['p50_ms']} at the same cost")
    return lost


def cases(
    kind_names: Sequence[str],
    loads: Sequence[float],
    replicas: Sequence[int],
    overhead: float,
    fleet: Fleet = "independent",
) -> list[Case]:
    out = []
    for kind in kind_names:
        config = kinds(overhead)[kind]
        workers = config.workers if isinstance(config, ServerConfig) else 1
        full = sla_capacity(WORKLOAD, workers, overhead)
        for n in replicas:
            how: Fleet = fleet if n > 1 else "independent"
            out += [Case(kind, load, n, load * full, how) for load in loads]
    return out


def _key(row: dict[str, Any]) -> tuple[str, int, str, float]:
    return (row["kind"], row["replicas"], row.get("fleet", "independent"), row["load"])


def markdown(results: Sequence[tuple[dict[str, Any], dict[str, Any], list[str]]]) -> str:
    head = (
        "| kind | replicas | fleet | load | req/s | adaptive viol. % | best static | its viol. % | "
        "adaptive goodput | its goodput | adaptive cost | its cost | adaptive p50 | its p50 | "
        "adaptive batch | its batch | verdict |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for a, b, lost in results:
        lines.append(
            f"| {a['kind']} | {a['replicas']} | {a.get('fleet', 'independent')} | "
            f"{a['load']:g} | {a['rate']:g} | "
            f"{a['violations_pct']} | {b['config']} | {b['violations_pct']} | "
            f"{a['goodput_rps']} | {b['goodput_rps']} | {a['cost']} | {b['cost']} | "
            f"{a['p50_ms']} | {b['p50_ms']} | {a['mean_batch']} | {b['mean_batch']} | "
            f"{'; '.join(lost) if lost else 'ok'} |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.grid", description=__doc__)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--loads", default="0.2,0.5,0.8,1,1.2")
    ap.add_argument("--replicas", default="1,3")
    ap.add_argument("--duration", type=float, default=40.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=20.0)
    ap.add_argument("--overhead-ms", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--fleet", choices=FLEETS, default="owner", help="with several replicas")
    ap.add_argument("--hop-ms", type=float, default=1.0, help="owner forwarding, each way")
    ap.add_argument(
        "--tuner-every", type=float, default=5.0, help="fleet tuner period, seconds (0: off)"
    )
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--adaptive-only", action="store_true", help="skip the grid (reuse --out)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/grid"))
    return ap


def _static_rows(rows: Sequence[dict[str, Any]], cache: Path) -> list[dict[str, Any]]:
    """The static rows of this run joined with the cache's rows of other cases; saved."""
    fresh = [r for r in rows if r["config"] != "adaptive"]
    redone = {_key(r) for r in fresh}
    old = json.loads(cache.read_text()) if cache.exists() else []
    static_rows = [r for r in old if _key(r) not in redone] + fresh  # keep other cases
    cache.write_text(json.dumps(static_rows))
    return static_rows


Result = tuple[dict[str, Any], dict[str, Any], list[str]]  # adaptive, best static, its losses


def _judged(
    todo: Sequence[Case], rows: Sequence[dict[str, Any]], static_rows: Sequence[dict[str, Any]]
) -> list[Result] | None:
    """Each case's adaptive row against its best static row; None (said on stderr) if a case
    has no static rows."""
    results = []
    for case in todo:
        key = (case.kind, case.replicas, case.fleet, case.load)

        def mine(r: dict[str, Any], key: tuple[str, int, str, float] = key) -> bool:
            return _key(r) == key

        a = next(r for r in rows if mine(r) and r["config"] == "adaptive")
        statics = [r for r in static_rows if mine(r)]
        if not statics:
            print(f"no static rows for {key}: run without --adaptive-only", file=sys.stderr)
            return None
        b = best_static(statics)
        results.append((a, b, judge(a, b)))
    return results


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overhead = args.overhead_ms / 1000.0
    todo = cases(
        args.kinds.split(","),
        [float(x) for x in args.loads.split(",")],
        [int(x) for x in args.replicas.split(",")],
        overhead,
        args.fleet,
    )
    run = Run(
        args.duration,
        args.warmup,
        overhead,
        args.seed,
        args.hop_ms / 1000.0,
        args.tuner_every or None,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    cache = args.out / "static.json"
    static_rows: list[dict[str, Any]] = []
    if args.adaptive_only and cache.exists():
        static_rows = json.loads(cache.read_text())
    jobs: list[tuple[Case, dict[str, Any], Run]] = []
    for case in todo:
        jobs.append((case, ADAPTIVE, run))
        if not args.adaptive_only:
            jobs += [(case, s, run) for s in static_grid()]
    began = time.monotonic()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        rows = list(pool.map(_run, jobs, chunksize=4))
    if not args.adaptive_only:
        static_rows = _static_rows(rows, cache)
    results = _judged(todo, rows, static_rows)
    if results is None:
        return 2
    losses = sum(bool(lost) for _, _, lost in results)
    text = (
        f"Simulated {args.duration:g} s after {args.warmup:g} s of warm-up, seed {args.seed}, "
        f"overhead {args.overhead_ms:g} ms per call, fleets of several replicas: {args.fleet} "
        f"(hop {args.hop_ms:g} ms), fleet tuner every {args.tuner_every:g} s (0: off), "
        f"{len(jobs)} runs in "
        f"{time.monotonic() - began:.0f} s; adaptive loses in {losses} of {len(results)} "
        "cases.\n\n" + markdown(results) + "\n"
    )
    (args.out / "grid.md").write_text(text, encoding="utf-8")
    (args.out / "grid.json").write_text(json.dumps(rows), encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
