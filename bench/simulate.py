"""Run the simulator over traces x profiles x modes; print and write the table and the plots.

    python -m bench.simulate                      # the suite of the README (a few minutes)
    python -m bench.simulate --profiles toxic --traces big_spike --duration 300

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

from bench.knative import ServiceConfig
from bench.profiles import PROFILES
from bench.sim import MODES, SimResult, pooled, simulate
from bench.traces import TRACES
from mlproxy.policy import Mode

__all__ = ["main", "markdown", "reductions"]

SUITE_PROFILES = ("iris", "toxic", "fashion-mnist")
COLUMNS = (
    ("mode", "mode"),
    ("cost_pod_s", "cost (pod-s)"),
    ("mean_pods", "mean pods"),
    ("sla_violations_pct", "SLA viol. %"),
    ("p50_ms", "p50 ms"),
    ("p95_ms", "p95 ms"),
    ("p99_ms", "p99 ms"),
    ("mean_batch", "mean batch"),
    ("cold_starts", "cold starts"),
    ("runs", "runs"),
)


def reductions(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Adaptive against off, in percent: cost and SLA violations (nan when off had none)."""
    by_mode = {r["mode"]: r for r in rows}
    off, ours = by_mode.get("off"), by_mode.get("adaptive")
    if off is None or ours is None:
        return {}

    def cut(key: str) -> float:
        return 100.0 * (1 - ours[key] / off[key]) if off[key] > 0 else math.nan

    return {"cost": cut("cost_pod_s"), "violations": cut("sla_violations_pct")}


def verdict(rows: Sequence[dict[str, Any]]) -> str:
    """Does adaptive have fewer violations than aimd and static, and no higher cost than aimd?"""
    by_mode = {r["mode"]: r for r in rows}
    if not {"adaptive", "aimd", "static"} <= set(by_mode):
        return ""
    ours = by_mode["adaptive"]
    parts = []
    for other in ("aimd", "static"):
        a, b = ours["sla_violations_pct"], by_mode[other]["sla_violations_pct"]
        parts.append(
            f"violations vs {other}: " + ("fewer" if a < b else "tie" if a == b else "MORE")
        )
    cheaper = ours["cost_pod_s"] <= by_mode["aimd"]["cost_pod_s"]
    parts.append("cost vs aimd: " + ("not higher" if cheaper else "HIGHER"))
    return "; ".join(parts)


def summary(results: Sequence[dict[str, Any]]) -> str:
    """One line per profile and trace: every mode's cost and SLA violations, adaptive's cuts."""
    groups: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in results:
        groups.setdefault((row["profile"], row["trace"]), {})[row["mode"]] = row
    modes = [m for m in MODES if any(m in g for g in groups.values())]
    head = ["profile", "trace"]
    head += [f"cost {m}" for m in modes] + [f"viol % {m}" for m in modes]
    head += ["adaptive vs off: cost", "violations"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (profile, trace), by_mode in groups.items():
        cells = [profile, trace]
        cells += [f"{by_mode[m]['cost_pod_s']:g}" if m in by_mode else "" for m in modes]
        cells += [f"{by_mode[m]['sla_violations_pct']:g}" if m in by_mode else "" for m in modes]
        cut = reductions(list(by_mode.values()))
        if cut:
            v = cut["violations"]
            cells.append(f"{-cut['cost']:+.1f}%")
            cells.append("n/a (off: 0)" if math.isnan(v) else f"{-v:+.1f}%")
        else:
            cells += ["", ""]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def markdown(results: Sequence[dict[str, Any]]) -> str:
    out: list[str] = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in results:
        groups.setdefault((row["profile"], row["trace"]), []).append(row)
    for (profile, trace), rows in groups.items():
        p = PROFILES[profile]
        out.append(
            f"#### {profile} (SLO {p.slo_ms:g} ms, peak {p.peak_rps:g} req/s), trace {trace}\n"
        )
        out.append("| " + " | ".join(title for _, title in COLUMNS) + " |")
        out.append("|" + "---|" * len(COLUMNS))
        for row in rows:
            out.append("| " + " | ".join(str(row[key]) for key, _ in COLUMNS) + " |")
        cut = reductions(rows)
        if cut:
            v = cut["violations"]
            vs = "n/a (off had none)" if math.isnan(v) else f"{-v:+.1f}%"
            out.append(
                f"\nadaptive vs off: cost {-cut['cost']:+.1f}%, SLA violations {vs}; "
                f"{verdict(rows)}\n"
            )
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
    axes[1].set_ylabel("ready pods")
    axes[2].set_ylabel("mean batch size")
    axes[2].set_xlabel("seconds")
    axes[0].legend(loc="upper right", fontsize="small", ncol=5)
    fig.suptitle(f"{first.profile} on {first.trace} (simulated Knative backend)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# aimd adjusts every 30 s from its first request: how its steps fall against a trace's phase
# changes decides how it meets a spike. A seeded random extra warm-up up to this long puts
# them at a random phase per seed, as in life.
PHASE_JITTER = 30.0


def warmup_for(warmup: float, seed: int) -> float:
    return warmup + random.Random(seed ^ 0xFA5E).uniform(0.0, PHASE_JITTER)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.simulate", description=__doc__)
    ap.add_argument("--profiles", default=",".join(SUITE_PROFILES))
    ap.add_argument("--traces", default=",".join(TRACES))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--duration", type=float, default=600.0, help="measured seconds per run")
    ap.add_argument("--warmup", type=float, default=120.0, help="unmeasured seconds first")
    ap.add_argument("--cold-start", type=float, default=ServiceConfig().cold_start)
    ap.add_argument("--replicas", type=int, default=1, help="proxy replicas sharing traffic")
    ap.add_argument("--seed", type=int, default=1, help="the first seed")
    ap.add_argument("--seeds", type=int, default=3, help="runs per case, seeds from --seed on")
    ap.add_argument("--out", type=Path, default=Path("bench/results/sim"))
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)
    profiles = [PROFILES[p] for p in args.profiles.split(",")]
    traces = args.traces.split(",")
    modes: list[Mode] = [m for m in MODES if m in args.modes.split(",")]
    backend = ServiceConfig(cold_start=args.cold_start)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    began = time.monotonic()
    for profile in profiles:
        for trace in traces:
            plotted = []
            for mode in modes:
                t0 = time.monotonic()
                runs = [
                    simulate(
                        trace,
                        profile,
                        mode,
                        args.duration,
                        profile.peak_rps,
                        seed=seed,
                        replicas=args.replicas,
                        backend=backend,
                        warmup=warmup_for(args.warmup, seed),
                    )
                    for seed in range(args.seed, args.seed + args.seeds)
                ]
                plotted.append(runs[0])
                row = pooled(runs)
                rows.append(row)
                print(
                    f"{profile.name:14s} {trace:17s} {mode:9s} "
                    f"viol {row['sla_violations_pct']:6.3f}%  cost {row['cost_pod_s']:9.1f} "
                    f"pod-s  ({time.monotonic() - t0:.1f} s)",
                    file=sys.stderr,
                    flush=True,
                )
            if not args.no_plots:
                plot(plotted, args.out / f"{profile.name}-{trace}.png")
    table = summary(rows) + "\n\n" + markdown(rows)
    header = (
        f"Simulated {args.duration:g} s per run after a warm-up of {args.warmup:g} s plus up to "
        f"{PHASE_JITTER:g} s, seeds {args.seed} to {args.seed + args.seeds - 1} pooled (cost "
        f"and cold starts per run), cold start {args.cold_start:g} s, {args.replicas} proxy "
        f"replica(s); {time.monotonic() - began:.0f} s of compute; plots: seed {args.seed}."
        "\n\n"
    )
    (args.out / "sim.md").write_text(header + table + "\n", encoding="utf-8")
    (args.out / "sim.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print(header + table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
