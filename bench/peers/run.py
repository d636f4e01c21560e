"""`python -m bench.peers`: the peer benchmark (see bench/peers/__init__.py)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.openloop import replay
from bench.peers import procs
from bench.peers.measure import Row, check_answers, markdown, plot, row, verdict
from bench.peers.systems import (
    DEFAULT_VENVS,
    MLPROXY_ROWS,
    SYSTEMS,
    MLProxySystem,
    PeerSystem,
    System,
    mlproxy_stack,
    peer_settings,
)
from bench.peers.workload import DEFAULT_RATES, Workload, arrivals, instance
from mlproxy.client import ApiError
from mlproxy.stack import StackError

__all__ = ["main", "measure"]


def measure(
    system: System,
    rate: float,
    run: int,
    workload: Workload,
    say: Callable[[str], None] = lambda line: None,
) -> Row:
    """One rate against a started system: warm-up and measured window in one open-loop replay
    (`bench.openloop`), every answer checked; the row."""
    system.prepare(run)
    times = arrivals(rate, workload.warmup + workload.duration, workload.seed)
    inputs = [instance(run, i) for i in range(len(times))]
    bodies = [system.wire.body(x) for x in inputs]
    total = workload.warmup + workload.duration

    def progress(elapsed: float, sent: int, answered: int, failed: int) -> None:
        if int(elapsed) % 5 == 0:
            say(f"    {min(elapsed, total):5.1f}/{total:g} s  sent {sent}  answered {answered}")

    roots = system.roots()
    cpu_before = procs.cpu_seconds(roots)
    load = replay(
        system.host,
        system.port,
        system.path,
        times,
        lambda i: bodies[i],
        timeout=workload.timeout,
        progress=progress,
    )
    cpu = procs.cpu_seconds(roots) - cpu_before
    loadavg = os.getloadavg()[0]
    wrong = check_answers(load.status, load.bodies, inputs, system.wire)
    start = load.started + workload.warmup
    batches = system.batches(start, start + workload.duration)
    out = row(system.name, rate, load, wrong, workload, batches)
    # the server's CPU time per request of the whole replay (warm-up included); the machine's
    # 1-minute load average at its end (2 cores shared with other work: context for the rest)
    out["cpu_ms_per_request"] = round(1000 * cpu / len(times), 2) if roots else math.nan
    out["loadavg"] = round(loadavg, 1)
    return out


@contextlib.contextmanager
def _started(
    names: Sequence[str],
    workload: Workload,
    run_dir: Path,
    venvs: Path,
    wait_ms: float | None,
    say: Callable[[str], None],
) -> Iterator[list[System]]:
    """The systems of one group (the MLProxy rows share a stack; a peer is alone), started."""
    if names[0] in MLPROXY_ROWS:
        say("starting MLProxy's stack (Redis, control plane, ext_proc, Envoy, emulators) ...")
        with mlproxy_stack(workload, run_dir / "mlproxy") as bench:
            yield [MLProxySystem(name, bench, workload) for name in names]
    else:
        with PeerSystem(names[0], workload, run_dir, venvs, wait_ms, say) as peer:
            yield [peer]


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m bench.peers",
        description="MLProxy against BentoML's, MLServer's and Ray Serve's batchers on issue "
        "13's workload (one batch at a time, t(b) = 20 + 2b ms, SLA 150 ms).",
    )
    ap.add_argument(
        "--rates",
        default=",".join(f"{r:g}" for r in DEFAULT_RATES),
        help="offered rates in req/s, comma-separated (default %(default)s)",
    )
    ap.add_argument(
        "--systems",
        default=",".join(SYSTEMS),
        help="comma-separated, of " + ", ".join(SYSTEMS) + " (default: all)",
    )
    defaults = Workload()
    ap.add_argument("--duration", type=float, default=defaults.duration, help="s measured")
    ap.add_argument("--warmup", type=float, default=defaults.warmup, help="s before, per rate")
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument(
        "--peer-wait-ms",
        type=float,
        help="MLServer's max_batch_time and Ray's batch_wait_timeout_s in ms "
        "(default: a quarter of the SLA)",
    )
    ap.add_argument("--venvs", type=Path, default=DEFAULT_VENVS, help="peers' environments")
    ap.add_argument("--out", type=Path, default=Path("bench/results/peers"))
    ap.add_argument("--no-plot", action="store_true")
    return ap


def _checked(
    ap: argparse.ArgumentParser, args: argparse.Namespace
) -> tuple[list[float], Workload, list[list[str]]]:
    """The rates, the workload and the groups of systems (the MLProxy rows share a stack,
    each peer is a group of its own), checked."""
    try:
        rates = [float(r) for r in args.rates.split(",") if r.strip()]
        workload = Workload(duration=args.duration, warmup=args.warmup, seed=args.seed)
    except ValueError as err:
        ap.error(str(err))
    if not rates or min(rates) <= 0:
        ap.error("--rates: positive numbers, e.g. 40,150,300")
    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SYSTEMS))
    if unknown or not names:
        ap.error(f"--systems: unknown {', '.join(unknown)}; choose from {', '.join(SYSTEMS)}")
    groups = [[n for n in MLPROXY_ROWS if n in names]] if set(names) & set(MLPROXY_ROWS) else []
    groups += [[n] for n in SYSTEMS if n in names and n not in MLPROXY_ROWS]
    return rates, workload, groups


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _run(
    groups: Sequence[Sequence[str]],
    rates: Sequence[float],
    workload: Workload,
    logs: Path,
    args: argparse.Namespace,
) -> tuple[list[Row], list[str]]:
    """Every system at every rate, group by group; the rows, and the groups that failed."""
    began = time.monotonic()
    rows: list[Row] = []
    failures: list[str] = []
    run = 0
    for group in groups:
        try:
            with _started(group, workload, logs, args.venvs, args.peer_wait_ms, _say) as systems:
                for system in systems:
                    for rate in rates:
                        run += 1
                        _say(f"{system.name} at {rate:g} req/s ({time.monotonic() - began:.0f} s)")
                        r = measure(system, rate, run, workload, _say)
                        rows.append(r)
                        _say(
                            f"  violations {r['violations_pct']}%, goodput {r['goodput_rps']} "
                            f"req/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, batch "
                            f"{r['mean_batch']}, errors {r['errors']}, wrong {r['wrong']}"
                        )
        except (StackError, ApiError, OSError) as err:
            failures.append(f"- {', '.join(group)}: {err}")
            _say(f"{', '.join(group)} failed: {err}")
    return rows, failures


def _header(
    command: str, started_at: str, elapsed: float, workload: Workload, wait_ms: float | None
) -> str:
    settings = peer_settings(workload, wait_ms)
    return (
        f"`{command.strip()}` on {started_at}, {elapsed / 60:.1f} min in all. Per rate: "
        f"{workload.warmup:g} s of warm-up, then {workload.duration:g} s measured; Poisson "
        f"arrivals (seed {workload.seed}), SLA {workload.sla_ms:g} ms at the client, a "
        f"request unanswered after {workload.timeout:g} s counts as `none`. Peers: max batch "
        f"{settings.max_batch}, BentoML max_latency_ms {settings.max_latency_ms}, MLServer "
        f"max_batch_time and Ray batch_wait_timeout_s {settings.wait_ms:g} ms, Ray "
        f"max_ongoing_requests {settings.max_ongoing}. p50/p99 of the requests answered 200."
    )


def main(argv: Sequence[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    rates, workload, groups = _checked(ap, args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    began = time.monotonic()
    started_at = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    rows, failures = _run(groups, rates, workload, logs, args)
    command = "python -m bench.peers " + " ".join(argv if argv is not None else sys.argv[1:])
    header = _header(command, started_at, time.monotonic() - began, workload, args.peer_wait_ms)
    text = "\n\n".join(
        [header, markdown(rows) if rows else "(no rows)", "\n".join(verdict(rows))]
        + (["Systems that could not run:\n" + "\n".join(failures)] if failures else [])
    )
    (out / "report.md").write_text(text + "\n", encoding="utf-8")
    (out / "results.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    if rows and not args.no_plot:
        plot(
            rows,
            out / "peers.png",
            f"One batch at a time, t(b) = 20 + 2b ms, SLA "
            f"{workload.sla_ms:g} ms: violations and goodput",
        )
    print(text)
    if failures or any(r["wrong"] for r in rows) or not np.all([r["requests"] for r in rows]):
        return 1
    return 0
