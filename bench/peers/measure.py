"""What every system is measured with, the same code for all: the request bodies and answers of
each wire format, the answer check, the row of one run, the table, the verdict and the plot.

Latency is the client's: from the moment a request was due (open loop) to its answer's last
byte. A request **violates** the SLA if it got no 200 or got it later than the SLA; **goodput**
is the number of requests answered 200 within the SLA per second of the measured window;
a 200 whose body is not exactly the model's answer for that request's own input (another
client's answer, a malformed body) is **wrong** (and a violation).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.openloop import OpenLoopResult
from bench.peers.workload import Workload, expected

__all__ = [
    "WIRES",
    "Wire",
    "check_answers",
    "errors_by_status",
    "markdown",
    "plot",
    "row",
    "verdict",
]

Row = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Wire:
    """How a system's clients talk to it: the body for one instance, and the one prediction
    read back from an answer (ValueError, KeyError, TypeError or IndexError if it has none)."""

    name: str
    body: Callable[[list[float]], bytes]
    decode: Callable[[bytes], list[float]]


def _kserve_body(x: list[float]) -> bytes:
    return json.dumps({"instances": [x]}).encode()


def _one(items: Any) -> list[float]:
    if not isinstance(items, list) or len(items) != 1 or not isinstance(items[0], list):
        raise ValueError(f"expected one prediction, got {items!r:.200}")
    return [float(v) for v in items[0]]


def _v2_body(x: list[float]) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "instances", "shape": [1, len(x)], "datatype": "FP64", "data": x}]}
    ).encode()


def _v2_decode(raw: bytes) -> list[float]:
    out = json.loads(raw)["outputs"][0]
    data = out["data"]
    if out.get("shape", [1])[0] != 1 or not isinstance(data, list):
        raise ValueError(f"expected one prediction, got {out!r:.200}")
    flat = data[0] if len(data) == 1 and isinstance(data[0], list) else data
    return [float(v) for v in flat]


WIRES = {
    # KServe V1 (MLProxy's codec; the Ray Serve handler speaks it too)
    "kserve-v1": Wire("kserve-v1", _kserve_body, lambda raw: _one(json.loads(raw)["predictions"])),
    # a BentoML batchable API with the parameter `instances`: the same request, a bare list back
    "bentoml": Wire("bentoml", _kserve_body, lambda raw: _one(json.loads(raw))),
    # MLServer: the V2 (Open Inference) protocol, one FP64 input of shape [1, 8]
    "v2": Wire("v2", _v2_body, _v2_decode),
}


def check_answers(
    status: np.ndarray, bodies: Sequence[bytes], inputs: Sequence[list[float]], wire: Wire
) -> np.ndarray:
    """Which requests got a 200 whose prediction is not exactly the model's for their own
    input (a boolean mask)."""
    wrong = np.zeros(len(inputs), dtype=bool)
    for i in (int(k) for k in np.flatnonzero(status == 200)):
        try:
            got = wire.decode(bodies[i])
        except (ValueError, KeyError, TypeError, IndexError):
            wrong[i] = True
            continue
        wrong[i] = got != expected(inputs[i])
    return wrong


def errors_by_status(status: np.ndarray) -> str:
    """'503: 12, none: 3' (none: no answer: refused, reset or timed out); '-' if none."""
    counts = Counter(int(s) for s in status if s != 200)
    if not counts:
        return "-"
    return ", ".join(
        f"{'none' if code == 0 else code}: {n}"
        for code, n in sorted(counts.items(), key=lambda kv: (kv[0] == 0, kv[0]))
    )


def row(
    system: str,
    rate: float,
    load: OpenLoopResult,
    wrong: np.ndarray,
    workload: Workload,
    batches: np.ndarray | None = None,
) -> Row:
    """The measured window's numbers: requests due from the warm-up's end to the run's end;
    `batches`: the sizes of the server's batches that started in that window (if known)."""
    measured = (load.scheduled >= workload.warmup) & (
        load.scheduled < workload.warmup + workload.duration
    )
    status = load.status[measured]
    latency = load.latency[measured]
    bad = wrong[measured]
    good = (status == 200) & ~bad
    within = good & (np.nan_to_num(latency, nan=math.inf) <= workload.sla)
    n = int(measured.sum())
    answered = latency[good]

    def pct(p: float) -> float:
        return round(float(np.percentile(answered, p)) * 1000, 1) if answered.size else math.nan

    send = load.send_error[measured]
    send = send[np.isfinite(send)] * 1000
    return {
        "system": system,
        "rate": rate,
        "requests": n,
        "offered_rps": round(n / workload.duration, 1),
        "violations_pct": round(100.0 * (1 - within.sum() / n), 2) if n else math.nan,
        "goodput_rps": round(float(within.sum()) / workload.duration, 1),
        "p50_ms": pct(50),
        "p99_ms": pct(99),
        "mean_batch": round(float(np.mean(batches)), 1)
        if batches is not None and batches.size
        else math.nan,
        "errors": errors_by_status(status),
        "wrong": int(bad.sum()),
        "send_error_p99_ms": round(float(np.percentile(send, 99)), 2) if send.size else math.nan,
    }


COLUMNS = (
    ("system", "system"),
    ("rate", "rate req/s"),
    ("offered_rps", "offered (measured)"),
    ("violations_pct", "violations %"),
    ("goodput_rps", "goodput req/s"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("mean_batch", "mean batch"),
    ("errors", "errors by status"),
    ("wrong", "wrong answers"),
    ("cpu_ms_per_request", "server CPU ms/req"),
    ("loadavg", "machine load"),
)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:g}"
    return str(value)


def markdown(rows: Sequence[Row]) -> str:
    """The table: one line per system and rate, by rate then system."""
    ordered = sorted(rows, key=lambda r: (r["rate"], _order(rows, r["system"])))
    lines = [
        "| " + " | ".join(title for _, title in COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += [
        "| " + " | ".join(_cell(r.get(key, math.nan)) for key, _ in COLUMNS) + " |" for r in ordered
    ]
    return "\n".join(lines)


def _order(rows: Sequence[Row], system: str) -> int:
    seen: list[str] = []
    for r in rows:
        if r["system"] not in seen:
            seen.append(r["system"])
    return seen.index(system)


def verdict(
    rows: Sequence[Row], ours: Sequence[str] = ("mlproxy-adaptive", "mlproxy-static")
) -> list[str]:
    """Whether each of `ours` is ahead of every other system on SLA attainment at every rate
    (fewer violations, or both at 0), and the wrong answers; one line each."""
    lines = []
    peers = sorted({r["system"] for r in rows} - set(ours), key=lambda s: _order(rows, s))
    by = {(r["system"], r["rate"]): r for r in rows}
    rates = sorted({r["rate"] for r in rows})
    for mine in ours:
        if not peers or not any(r["system"] == mine for r in rows):
            lines.append(f"- {mine}: nothing to compare (it or every peer did not run)")
            continue
        behind = []
        level = []
        for rate in rates:
            me = by.get((mine, rate))
            if me is None:
                continue
            for peer in peers:
                other = by.get((peer, rate))
                if other is None:
                    continue
                a, b = me["violations_pct"], other["violations_pct"]
                if a == b == 0:
                    level.append(f"{peer} at {rate:g} req/s")
                elif not a < b:
                    behind.append(f"{peer} at {rate:g} req/s ({a:g}% against {b:g}%)")
        ties = f" (both at 0% violations: {', '.join(level)})" if level else ""
        if behind:
            lines.append(
                f"- {mine} is NOT ahead of every peer: level or behind " + "; ".join(behind) + ties
            )
        else:
            lines.append(f"- {mine} is ahead of every peer at every rate on SLA attainment{ties}")
    wrong = {r["system"]: 0 for r in rows}
    for r in rows:
        wrong[r["system"]] += r["wrong"]
    lines.append(
        "- wrong answers: "
        + ", ".join(f"{system} {n}" for system, n in wrong.items())
        + (" (none)" if not any(wrong.values()) else "")
    )
    return lines


def plot(rows: Sequence[Row], path: Path, title: str) -> None:
    """Violations and goodput against the offered rate, one line per system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True)
    systems = sorted({r["system"] for r in rows}, key=lambda s: _order(rows, s))
    rates = sorted({r["rate"] for r in rows})
    for system in systems:
        mine = sorted((r for r in rows if r["system"] == system), key=lambda r: r["rate"])
        x = [r["rate"] for r in mine]
        top.plot(x, [r["violations_pct"] for r in mine], marker="o", label=system)
        bottom.plot(x, [r["goodput_rps"] for r in mine], marker="o", label=system)
    bottom.plot(rates, rates, color="grey", linestyle=":", label="offered")
    top.set_ylabel("SLA violations (%)")
    top.set_ylim(-2, 102)
    bottom.set_ylabel("goodput (answers within the SLA per s)")
    bottom.set_xlabel("offered rate (req/s)")
    top.legend(fontsize="small")
    bottom.legend(fontsize="small")
    top.set_title(title, fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
