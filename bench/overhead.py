"""Proxy overhead: Envoy -> model directly versus Envoy -> ext_proc -> model, in one run.

    python bench/overhead.py [--duration 5] [--concurrency 1,16,64] [--max-wait-ms 2]

One stack (Envoy, one ext_proc process, the demo model with 8-wide hidden layers so that it
does negligible work); the direct path is an Envoy route with ext_proc disabled. For each
concurrency both paths run back to back, and the table gives throughput, latency, and the
ratios of batched to direct measured in the same run. Every answer is checked against the
model's own answer for that input.

A third path, `noop ext_proc`, is a second Envoy in front of bench/noop_extproc.py, which
answers every request with a canned body: the floor of any Python ext_proc on grpcio here.
A fourth, `lean batcher` (`--no-lean` leaves it out), is bench/lean_batcher.py behind an Envoy
of its own: the least a Python ext_proc that batches does (queue, timer, one HTTP call a batch,
split), batching as the static policy does and doing nothing else: the floor of batching in
Python, against which MLProxy's own work (its checks, SLA clock, metrics, isolation rules)
shows. `--without PART,...` takes parts of that work off MLProxy's request path (those of
bench/servicer_cost.py, the same way) to measure what each costs on the real stack.
The CPU columns give each process's CPU time per request (from /proc), which shows where a
2-core machine's budget goes. `--rounds N` measures every path N times at each concurrency,
alternating, and ends with each ext_proc's CPU per request of the noop floor's and its
throughput of direct Envoy's, round by round and their medians: issue 14's two figures, read
from one run on a machine whose single runs move with its neighbours.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import statistics
import sys
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.httpload import CLIENT_HEADERS, LoadResult, run_load
from bench.servicer_cost import LATENCY_SLA, MODES, PARTS, bench_policy
from mlproxy.demo import random_inputs
from mlproxy.demo_model import MLPModel
from mlproxy.envoy_config import EXT_PROC_FILTER, local_config
from mlproxy.loadgen import percentile
from mlproxy.stack import Child, Stack, envoy_binary, http_ok, tcp_ok

HIDDEN = 8


def batch_stats(metrics_url: str) -> tuple[float, float]:
    """(sum, count) of mlproxy_batch_size."""
    text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("mlproxy_batch_size_sum"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("mlproxy_batch_size_count"):
            count += float(line.rsplit(" ", 1)[1])
    return total, count


def model_batches(model_url: str) -> tuple[float, float]:
    """(instances, calls) the demo model has predicted."""
    text = urllib.request.urlopen(f"{model_url}/metrics", timeout=5).read().decode()
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if line[:1] != "#")
    return (
        float(values.get("demo_model_predict_instances_total", 0)),
        float(values.get("demo_model_predict_calls_total", 0)),
    )


def cpu_seconds(pid: int, children: bool = True) -> float:
    """CPU time of a process and (unless `children` is False) of its live children: the
    workers of `--workers`."""
    by_pid = cpu_by_process(pid)
    return sum(by_pid.values()) if children else by_pid[pid]


def cpu_by_process(pid: int) -> dict[int, float]:
    """CPU seconds of `pid` and of each of its children, by pid."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        child = int(stat.parent.name)
        if child == pid or int(fields[1]) == pid:
            out[child] = (int(fields[11]) + int(fields[12])) / tick
    return out


def start_noop(stack: Stack, variant: str = "answer") -> tuple[int, Child, Child]:
    """bench/noop_extproc.py (`--variant`) behind an Envoy of its own (both stop with the
    stack); returns that Envoy's listener port, the noop and the Envoy."""
    suffix = "" if variant == "answer" else f"-{variant}"
    script = str(Path(__file__).with_name("noop_extproc.py"))
    return start_beside(
        stack,
        f"noop{suffix}",
        lambda port: [sys.executable, script, str(port), "--variant", variant],
        streamed=variant == "no-header-response",
    )


def start_lean(stack: Stack, args: argparse.Namespace) -> tuple[int, Child, Child]:
    """bench/lean_batcher.py, batching as the static policy does, behind an Envoy of its own."""
    script = str(Path(__file__).with_name("lean_batcher.py"))
    url = f"{stack.model_url}/v1/models/demo:predict"
    return start_beside(
        stack,
        "lean",
        lambda port: [
            sys.executable,
            script,
            str(port),
            url,
            "--max-wait-ms",
            str(args.max_wait_ms),
            "--max-batch-size",
            str(args.max_batch_size),
            "--max-in-flight",
            str(args.max_in_flight),
        ],
    )


def start_beside(
    stack: Stack, name: str, argv: Callable[[int], list[str]], streamed: bool = False
) -> tuple[int, Child, Child]:
    """An ext_proc server (`argv` of its gRPC port) behind an Envoy of its own, beside the
    stack's (both stop with the stack): that Envoy's listener port, the server and the Envoy.
    `streamed`: the body is streamed and sent without waiting for the headers' answer."""
    assert stack.run_dir is not None
    grpc_port, listener, admin = (stack.reserve_port() for _ in range(3))
    server = Child(
        name,
        argv(grpc_port),
        stack.run_dir / f"{name}.log",
        # listening before its Envoy takes traffic: Envoy starts faster than Python imports
        # grpc, and the first requests were refused (500s in the noop rows)
        ready=lambda: tcp_ok("127.0.0.1", grpc_port),
    )
    envoy_config = local_config(listener, [("127.0.0.1", grpc_port)], stack.model_port, admin)
    if streamed:
        for f in envoy_config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
            "typed_config"
        ]["http_filters"]:
            if f["name"] == EXT_PROC_FILTER:
                f["typed_config"]["processing_mode"]["request_body_mode"] = "STREAMED"
                f["typed_config"]["send_body_without_waiting_for_header_response"] = True
    config = stack.run_dir / f"envoy-{name}.yaml"
    config.write_text(yaml.safe_dump(envoy_config))
    envoy = Child(
        f"envoy-{name}",
        [
            envoy_binary(),
            "-c",
            str(config),
            "--log-level",
            "warn",
            "--disable-hot-restart",
            "--concurrency",
            "1",
        ],
        stack.run_dir / f"envoy-{name}.log",
    )
    envoy.ready = lambda: http_ok(f"http://127.0.0.1:{listener}/healthz")
    stack.start_child(server)
    stack.start_child(envoy)
    return listener, server, envoy


def _positive(text: str) -> int:
    """A whole number of at least 1, for argparse (which then names the option)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-in-flight", type=int, default=2)
    parser.add_argument("--inputs", type=int, default=2048, help="distinct inputs")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="time steps inside ext_proc (bench/probe.py: the body's wait, the batch timer's "
        "lateness, the batch call) and print their percentiles; use one concurrency",
    )
    parser.add_argument(
        "--client-headers",
        action="store_true",
        help="every request carries what a real client adds (bench/httpload.py CLIENT_HEADERS: "
        "12 headers, 1.6 KB, credentials among them)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="`mlproxy extproc --workers` (docs/operations.md, 'Workers')",
    )
    parser.add_argument(
        "--mode",
        choices=MODES,
        default="static",
        help="the policy: static (max wait, batch size, in flight as given), or adaptive with a "
        "100 ms SLA at p99 and objective latency (sends whenever a slot is free) or cost (the "
        "default objective: holds requests as long as their deadlines allow)",
    )
    parser.add_argument(
        "--without",
        default="",
        metavar="PART,...",
        help="take these parts of MLProxy's own work off its request path (those of "
        "bench/servicer_cost.py --without): what each costs on the real stack is the "
        "difference with a run that keeps it; the mean batch is then the model's count",
    )
    parser.add_argument(
        "--rounds",
        type=_positive,
        default=1,
        help="measure every path this many times at each concurrency, alternating, and print "
        "each ext_proc's CPU per request of the noop floor's and its throughput of direct "
        "Envoy's, round by round and their medians (this machine's noise moves single runs)",
    )
    parser.add_argument(
        "--lean",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure bench/lean_batcher.py too: the least a Python batching ext_proc does, "
        "batching as the static policy does (its max wait, batch size and in flight)",
    )
    return parser


def _without_env(without: str, probe: str = "") -> dict[str, str]:
    """The ext_proc's environment for `--without` and `--probe` (the file it writes): with
    either, bench/without_site first on its path."""
    parts = [p for p in without.split(",") if p]
    if not parts and not probe:
        return {}
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise SystemExit(f"--without: unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    here = Path(__file__).resolve()
    path = [str(here.with_name("without_site")), str(here.parents[1])]
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    env = {"PYTHONPATH": os.pathsep.join(path), "MLPROXY_BENCH_WITHOUT": ",".join(parts)}
    if probe:
        env["MLPROXY_BENCH_PROBE"] = probe
    return env


def _policies(args: argparse.Namespace, model_url: str) -> dict[str, Any]:
    """The policies file: one policy, `--mode`'s."""
    url = f"{model_url}/v1/models/{{model}}:predict"
    return {
        "policies": [
            bench_policy(args.mode, url, args.max_wait_ms, args.max_batch_size, args.max_in_flight)
        ]
    }


def _described(args: argparse.Namespace) -> str:
    described = (
        f"static, max_wait_ms {args.max_wait_ms}"
        if args.mode == "static"
        else f"adaptive, objective {args.mode}, SLA {LATENCY_SLA['latency_ms']} ms at "
        f"p{LATENCY_SLA['percentile']}"
    )
    return (
        f"policy: {described}, max_batch_size {args.max_batch_size}, "
        f"max_in_flight {args.max_in_flight}; {args.duration:.0f} s per measurement; "
        f"{args.workers} ext_proc worker{'s' if args.workers > 1 else ''}"
    )


@dataclass(frozen=True)
class LoadPath:
    """One way to the model: its name in the table, Envoy's port and path, the check of an
    answer, and the process that proxies it (`Measurer.pids`)."""

    name: str
    port: int
    path: str
    check: Callable[[int, bytes], bool]
    proxy: str
    envoy: str = "envoy"


# (concurrency, path, its load, mean batch, CPU microseconds per request by process)
Row = tuple[int, str, LoadResult, float, dict[str, float]]


class Measurer:
    """Measures the paths of a started stack, one concurrency after another."""

    def __init__(self, stack: Stack, args: argparse.Namespace, bodies: list[bytes]) -> None:
        self.stack, self.args, self.bodies = stack, args, bodies
        self.metrics_url = f"http://{stack.host}:{stack.metrics_port}/metrics"
        self.pids = {c.name: c.proc.pid for c in stack.children if c.proc is not None}
        self.pids["loadgen"] = os.getpid()

    def measure(self, c: int, p: LoadPath) -> Row:
        """`p` at concurrency `c`: its load, ext_proc's mean batch, and each process's CPU."""
        pids, args = self.pids, self.args
        watched = {"envoy": pids[p.envoy], "loadgen": pids["loadgen"]}
        if p.name != "direct":
            watched["ext_proc"] = pids[p.proxy]
        if p.name != "noop ext_proc":
            watched["model"] = pids["model"]
        before = batch_stats(self.metrics_url)
        model_before = model_batches(self.stack.model_url)
        # the load generator's own CPU (its children are the stack)
        cpu0 = {k: cpu_seconds(pid, k != "loadgen") for k, pid in watched.items()}
        split0 = cpu_by_process(pids["extproc-0"])
        r = asyncio.run(
            run_load(
                self.stack.host,
                p.port,
                p.path,
                self.bodies,
                c,
                args.duration,
                p.check,
                headers=CLIENT_HEADERS if args.client_headers else "",
            )
        )
        cpu1 = {k: cpu_seconds(pid, k != "loadgen") for k, pid in watched.items()}
        split1 = cpu_by_process(pids["extproc-0"])
        after = batch_stats(self.metrics_url)
        model_after = model_batches(self.stack.model_url)
        if p.name == "mlproxy" and args.workers > 1:
            shares = [
                f"pid {pid}: {(split1[pid] - split0.get(pid, 0.0)) / args.duration:.2f}"
                for pid in sorted(split1)
            ]
            print(
                f"concurrency {c}: ext_proc CPU per second by process (supervisor "
                f"first): {', '.join(shares)}",
                flush=True,
            )
        if p.name == "lean batcher" or args.without:  # no count of its own: the model's
            before, after = model_before, model_after
        calls = after[1] - before[1]
        mean_batch = (after[0] - before[0]) / calls if calls else 1.0
        n = max(r.ok, 1)
        cpu = {k: (cpu1[k] - cpu0[k]) / n * 1e6 for k in watched}
        return (c, p.name, r, mean_batch if p.name in ("mlproxy", "lean batcher") else 1.0, cpu)


def _compare(c: int, direct: LoadResult, batched: LoadResult, wait: float) -> None:
    """MLProxy against the direct path at concurrency `c`, and where its time goes."""
    d, m = direct, batched
    added = (percentile(m.latencies, 50) - percentile(d.latencies, 50)) * 1000
    if m.in_extproc and m.queued:
        inside = percentile(m.in_extproc, 50) * 1000
        print(
            f"concurrency {c}: MLProxy p50 {percentile(m.latencies, 50) * 1000:.2f} ms "
            f"at the client, {inside:.2f} ms in ext_proc (from its headers to its "
            f"answer; {percentile(m.queued, 50) * 1000:.2f} ms of it queued), "
            f"{percentile(m.latencies, 50) * 1000 - inside:.2f} ms outside",
            flush=True,
        )
    print(
        f"concurrency {c}: MLProxy adds {added:.2f} ms to p50, "
        f"{added - wait:.2f} ms beyond max wait; throughput "
        f"x{m.rate / d.rate:.2f} of direct, p99 x"
        f"{percentile(m.latencies, 99) / percentile(d.latencies, 99):.2f}",
        flush=True,
    )


def round_ratios(results: dict[str, Row]) -> dict[str, tuple[float, float]]:
    """One round at one concurrency: each ext_proc path's CPU per request as a multiple of
    the noop floor's, and its throughput as a share of direct Envoy's (NaN where the floor or
    direct served nothing)."""
    direct = results["direct"][2].rate
    floor = results["noop ext_proc"][4].get("ext_proc", 0.0)
    out = {}
    for name, (_, _, r, _, cpu) in results.items():
        if name == "direct":
            continue
        out[name] = (_ratio(cpu["ext_proc"], floor), _ratio(r.rate, direct))
    return out


def summary(c: int, rounds: Sequence[dict[str, tuple[float, float]]]) -> list[str]:
    """What `round_ratios` gave round by round at concurrency `c`, with their medians: one line
    per ext_proc path (issue 14's figures: ext_proc CPU of the floor, throughput of direct)."""
    lines = []
    for name in rounds[0] if rounds else ():
        cpu = [r[name][0] for r in rounds]
        share = [r[name][1] for r in rounds]
        lines.append(
            f"concurrency {c}, {name}, {len(rounds)} round{'s' if len(rounds) > 1 else ''}: "
            f"ext_proc CPU x{_listed(cpu)} of the noop floor "
            f"(median {statistics.median(cpu):.2f}); "
            f"throughput x{_listed(share)} of direct (median {statistics.median(share):.2f})"
        )
    if rounds and "lean batcher" in rounds[0] and "mlproxy" in rounds[0]:
        # the same rounds' ratios divided: MLProxy's own work against the least batching does
        cpu = [_ratio(r["mlproxy"][0], r["lean batcher"][0]) for r in rounds]
        share = [_ratio(r["mlproxy"][1], r["lean batcher"][1]) for r in rounds]
        lines.append(
            f"concurrency {c}, mlproxy against the lean batcher: ext_proc CPU x{_listed(cpu)} "
            f"(median {statistics.median(cpu):.2f}); throughput x{_listed(share)} "
            f"(median {statistics.median(share):.2f})"
        )
    return lines


def _ratio(a: float, b: float) -> float:
    """a / b, or NaN where b is not a positive number (a path that served nothing): the run's
    figures are still printed."""
    return a / b if b > 0 else math.nan


def _listed(values: Sequence[float]) -> str:
    return ", ".join(f"{v:.2f}" for v in values)


def _table(rows: Sequence[Row]) -> None:
    print()
    print(
        "| concurrency | path | req/s | p50 ms | p99 ms | mean batch | non-200 | wrong "
        "| CPU us/req: envoy | ext_proc | model | loadgen |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    for c, name, r, batch, cpu in rows:
        non200 = sum(k for s, k in r.statuses.items() if s != 200)
        cells = " | ".join(
            f"{cpu[k]:.0f}" if k in cpu else "-" for k in ("envoy", "ext_proc", "model", "loadgen")
        )
        print(
            f"| {c} | {name} | {r.rate:.0f} | {percentile(r.latencies, 50) * 1000:.2f} | "
            f"{percentile(r.latencies, 99) * 1000:.2f} | {batch:.1f} | {non200} | {r.wrong} "
            f"| {cells} |"
        )


def _print_probe(path: Path) -> None:
    """What bench/probe.py measured inside ext_proc (over every concurrency of the run)."""
    try:
        steps = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        print(f"probe: no figures from ext_proc ({err})")
        return
    for name, p in steps.items():
        print(
            f"probe: {name}: p10 {p['p10']:.3f} ms, p50 {p['p50']:.3f} ms, "
            f"p90 {p['p90']:.3f} ms ({p['n']} samples)"
        )


# Long: one stack, its four paths and their measurements in order, read top to bottom.
def main() -> int:
    args = _parser().parse_args()
    inputs = random_inputs(args.inputs, seed=3)
    model = MLPModel(hidden=HIDDEN)
    expected = [model.predict([x]) for x in inputs]
    bodies = [json.dumps({"instances": [x]}).encode() for x in inputs]

    def check(i: int, body: bytes) -> bool:
        return bool(json.loads(body)["predictions"] == expected[i])

    def check_noop(i: int, body: bytes) -> bool:
        return body.startswith(b'{"predictions"')

    stack = Stack(
        envoy_port=0,
        bypass_prefix="/direct/",
        model_args=["--hidden", str(HIDDEN)],
        extproc_workers=args.workers,
    )
    assert stack.run_dir is not None
    probe = stack.run_dir / "probe.json" if args.probe else None
    stack.extproc_env = _without_env(args.without, str(probe or ""))
    stack.policies_file = stack.run_dir / "bench-policies.json"
    stack.policies_file.write_text(json.dumps(_policies(args, stack.model_url)))
    wait = args.max_wait_ms if args.mode == "static" else 0.0  # what "beyond max wait" means
    print(_described(args), flush=True)
    rows: list[Row] = []
    with stack:
        noop_port, _, _ = start_noop(stack)
        lean_port, _, _ = start_lean(stack, args) if args.lean else (0, None, None)
        measurer = Measurer(stack, args, bodies)
        paths = [
            LoadPath("direct", stack.envoy_port, "/direct/v1/models/demo:predict", check, "envoy"),
            LoadPath(
                "noop ext_proc",
                noop_port,
                "/v1/models/demo:predict",
                check_noop,
                "noop",
                "envoy-noop",
            ),
            LoadPath("mlproxy", stack.envoy_port, "/v1/models/demo:predict", check, "extproc-0"),
        ]
        if args.lean:
            paths.insert(
                2,
                LoadPath(
                    "lean batcher",
                    lean_port,
                    "/v1/models/demo:predict",
                    check,
                    "lean",
                    "envoy-lean",
                ),
            )
        summaries: list[str] = []
        for c in [int(x) for x in args.concurrency.split(",")]:
            rounds = []
            for _ in range(args.rounds):
                results = {p.name: measurer.measure(c, p) for p in paths}
                rows += results.values()
                _compare(c, results["direct"][2], results["mlproxy"][2], wait)
                rounds.append(round_ratios(results))
            summaries += summary(c, rounds)
    if probe is not None:
        _print_probe(probe)
    shutil.rmtree(stack.run_dir, ignore_errors=True)  # its logs are kept when a run fails
    _table(rows)
    print()
    for line in summaries:
        print(line)
    return 1 if sum(r.wrong for _, _, r, _, _ in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
