"""Run the simulator over traces x profiles x modes; print and write the table and the plots.

    python -m bench.simulate                      # the suite of docs/benchmarks.md (minutes)
    python -m bench.simulate --profiles toxic --traces big_spike --duration 300
    python -m bench.simulate --backend fixed --workers 1 --overhead-ms 20 \
        --profiles toxic --loads 0.2,0.5,0.8,1,1.2 --duration 60 --seeds 1

`--backend` picks the backend kind (`bench/backends.py`): `knative` (default), `fixed`
(`--workers`, `--overhead-ms`, `--queue-limit`) or `limited` (`--workers`, `--overhead-ms`,
`--limit`). `--loads` sweeps steady Poisson load at those fractions of a server's capacity at
the modes' max batch size (workers x b / t(b)), instead of the traces at their peaks.

Writes `<out>/sim.md` (the tables), `<out>/sim.json` (every row) and, unless `--no-plots`, one
PNG per trace and profile: p95 latency against the SLO, ready pods and batch size over time,
one line per mode.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import report
from bench.backends import KINDS, BackendConfig, ServerConfig, backend_config, capacity
from bench.knative import ServiceConfig
from bench.profiles import PROFILES, Profile
from bench.report import by_case, columns_for, heading, reductions, summary, table, verdict
from bench.sim import FLEETS, MODES, ModeConfig, SimResult, pooled, simulate
from bench.traces import TRACES
from mlproxy_kernel.policy import Mode

__all__ = ["main", "markdown", "sweep_markdown"]

SUITE_PROFILES = ("iris", "toxic", "fashion-mnist")
COLUMNS = (
    *report.COLUMNS,
    ("runs", "runs"),
)


def markdown(results: Sequence[dict[str, Any]]) -> str:
    out: list[str] = []
    for (profile, trace), case in by_case(results).items():
        out.append(heading(profile, trace))
        rows = list(case.values())
        out += table(rows, columns_for(rows, COLUMNS))
        cut = reductions(case)
        if cut:
            v = cut["violations"]
            vs = "n/a (off had none)" if math.isnan(v) else f"{-v:+.1f}%"
            out.append(
                f"\nadaptive vs off: cost {-cut['cost']:+.1f}%, SLA violations {vs}; "
                f"{verdict(case)}\n"
            )
    return "\n".join(out)


SWEEP_COLUMNS = (
    ("load", "load"),
    ("offered_rps", "offered req/s"),
    *report.SERVER_COLUMNS,
)


def sweep_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """One table per profile: every load and mode of a sweep (rows with `load`)."""
    out: list[str] = []
    profiles = dict.fromkeys(r["profile"] for r in rows)
    for profile in profiles:
        p = PROFILES[profile]
        out.append(f"#### {profile} (SLO {p.slo_ms:g} ms at p95), steady Poisson load\n")
        out += table([r for r in rows if r["profile"] == profile], SWEEP_COLUMNS)
        out.append("")
    return "\n".join(out)


def plot(results: Sequence[SimResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    first = results[0]
    for r in results:
        s = r.series
        axes[0].plot(s["t"], s["p95_ms"], label=r.mode)
        axes[1].step(s["t"], s["pods"], where="post", label=r.mode)
        axes[2].plot(s["t"], s["batch"], label=r.mode)
    axes[0].axhline(first.slo * 1000, color="red", linestyle="--", label="SLO")
    axes[0].set_ylabel("p95 latency (ms)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("ready pods" if first.backend == "knative" else "busy workers")
    axes[2].set_ylabel("mean batch size")
    axes[2].set_xlabel("seconds")
    axes[0].legend(loc="upper right", fontsize="small", ncol=5)
    fig.suptitle(f"{first.profile} on {first.trace} (simulated {first.backend} backend)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# aimd adjusts every 30 s from its first request: how its steps fall against a trace's phase
# changes decides how it meets a spike. A seeded random extra warm-up up to this long puts
# them at a random phase per seed, as in life.
PHASE_JITTER = 30.0


def warmup_for(warmup: float, seed: int) -> float:
    return warmup + random.Random(seed ^ 0xFA5E).uniform(0.0, PHASE_JITTER)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__)
    ap.add_argument("--profiles", default=",".join(SUITE_PROFILES))
    ap.add_argument("--traces", default=",".join(TRACES))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--duration", type=float, default=600.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=120.0, help="unmeasured seconds first")
    ap.add_argument("--cold-start", type=float, default=ServiceConfig().cold_start)
    ap.add_argument("--backend", choices=KINDS, default="knative", help="the backend kind")
    ap.add_argument("--workers", type=int, default=1, help="fixed/limited: batches at once")
    ap.add_argument(
        "--overhead-ms", type=float, default=0.0, help="fixed/limited: added to every call"
    )
    ap.add_argument(
        "--queue-limit", type=int, help="fixed: batches that may wait, then 503 (unbounded)"
    )
    ap.add_argument(
        "--limit", type=int, help="limited: batches in the server, then 429 (--workers)"
    )
    ap.add_argument(
        "--loads",
        help="fixed/limited: sweep steady load at these fractions of capacity (e.g. 0.2,0.5,1)",
    )
    ap.add_argument("--replicas", type=int, default=1, help="proxy replicas sharing traffic")
    ap.add_argument(
        "--fleet",
        choices=FLEETS,
        default="owner",
        help="how several replicas share the backend (bench/sim.py; default %(default)s)",
    )
    ap.add_argument("--hop-ms", type=float, default=1.0, help="owner forwarding, each way")
    ap.add_argument(
        "--tuner-every",
        type=float,
        default=5.0,
        help="the control plane's fleet tuner runs every this many seconds (0: off)",
    )
    ap.add_argument("--seed", type=int, default=1, help="the first seed")
    ap.add_argument("--seeds", type=int, default=3, help="runs per case, seeds from --seed on")
    ap.add_argument("--out", type=Path, default=Path("bench/results/sim"))
    ap.add_argument("--no-plots", action="store_true")
    return ap


def _backend(ap: argparse.ArgumentParser, args: argparse.Namespace) -> BackendConfig:
    try:
        return backend_config(
            args.backend,
            args.workers,
            args.overhead_ms,
            args.limit,
            args.queue_limit,
            knative=ServiceConfig(cold_start=args.cold_start),
        )
    except ValueError as err:
        ap.error(str(err))


def _loads(
    ap: argparse.ArgumentParser, args: argparse.Namespace, backend: BackendConfig
) -> list[float]:
    """`--loads`, checked (none: the traces at their peaks)."""
    if not args.loads:
        return []
    if not isinstance(backend, ServerConfig):
        ap.error(
            "--loads needs a fixed or limited backend (a Knative service has no fixed capacity)"
        )
    try:
        loads = [float(x) for x in args.loads.split(",")]
    except ValueError:
        ap.error(f"--loads must be numbers separated by commas: {args.loads!r}")
    if not all(x > 0 for x in loads):
        ap.error("every load must be positive")
    return loads


Case = tuple[Profile, str, float, float | None]  # profile, trace, peak, load


def _cases(
    profiles: Sequence[Profile],
    traces: Sequence[str],
    loads: Sequence[float],
    backend: BackendConfig,
) -> list[Case]:
    """Every profile at each load of a sweep, or on each trace at its peak."""
    cases: list[Case] = []
    for profile in profiles:
        if loads:
            assert isinstance(backend, ServerConfig)
            full = capacity(profile, backend, ModeConfig().max_batch_size)
            cases += [(profile, f"steady@{x:g}", x * full, x) for x in loads]
        else:
            cases += [(profile, trace, profile.peak_rps, None) for trace in traces]
    return cases


def _run_mode(
    args: argparse.Namespace, backend: BackendConfig, case: Case, mode: Mode
) -> tuple[SimResult, dict[str, Any]]:
    """One mode of a case under every seed: the first seed's run (to plot) and the pooled row,
    reported on stderr as it ends."""
    profile, trace, peak, load = case
    t0 = time.monotonic()
    runs = [
        simulate(
            trace.split("@")[0],
            profile,
            mode,
            args.duration,
            peak,
            seed=seed,
            replicas=args.replicas,
            backend=backend,
            warmup=warmup_for(args.warmup, seed),
            fleet=args.fleet,
            hop=args.hop_ms / 1000.0,
            tuner_every=args.tuner_every or None,
        )
        for seed in range(args.seed, args.seed + args.seeds)
    ]
    for r in runs:
        r.trace = trace
    row = pooled(runs)
    if load is not None:
        row = {"load": load, "offered_rps": round(peak, 1)} | row
    print(
        f"{profile.name:14s} {trace:17s} {mode:9s} "
        f"viol {row['sla_violations_pct']:6.3f}%  cost {row['cost_pod_s']:9.1f} "
        f"s  goodput {row['goodput_rps']:8.2f}/s  ({time.monotonic() - t0:.1f} s)",
        file=sys.stderr,
        flush=True,
    )
    return runs[0], row


def _header(
    args: argparse.Namespace, backend: BackendConfig, loads: Sequence[float], compute: float
) -> str:
    kind = (
        backend.describe()
        if isinstance(backend, ServerConfig)
        else f"knative, cold start {args.cold_start:g} s"
    )
    if loads:
        kind += ", load: offered rate / capacity at max batch size"
    return (
        f"Simulated {args.duration:g} s per run after a warm-up of {args.warmup:g} s plus up to "
        f"{PHASE_JITTER:g} s, seeds {args.seed} to {args.seed + args.seeds - 1} pooled (cost "
        f"and cold starts per run), backend {kind}, {args.replicas} proxy "
        f"replica(s) ({args.fleet if args.replicas > 1 else 'alone'}), fleet tuner every "
        f"{args.tuner_every:g} s (0: off); {compute:.0f} s of compute; "
        f"plots: seed {args.seed}."
        "\n\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    profiles = [PROFILES[p] for p in args.profiles.split(",")]
    traces = args.traces.split(",")
    modes: list[Mode] = [m for m in MODES if m in args.modes.split(",")]
    backend = _backend(ap, args)
    loads = _loads(ap, args, backend)
    if loads:
        traces = ["steady"]
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    began = time.monotonic()
    for case in _cases(profiles, traces, loads, backend):
        plotted = []
        for mode in modes:
            first, row = _run_mode(args, backend, case, mode)
            plotted.append(first)
            rows.append(row)
        if not args.no_plots:
            plot(plotted, args.out / f"{case[0].name}-{case[1]}.png")
    text = sweep_markdown(rows) if loads else summary(rows) + "\n\n" + markdown(rows)
    header = _header(args, backend, loads, time.monotonic() - began)
    (args.out / "sim.md").write_text(header + text + "\n", encoding="utf-8")
    (args.out / "sim.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print(header + text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
