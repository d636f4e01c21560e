"""Markdown tables shared by the simulator's report and the real stack's: rows are dicts with
at least `profile`, `trace`, `mode`, `cost_pod_s` and `sla_violations_pct`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from bench.profiles import PROFILES
from bench.sim import MODES

__all__ = [
    "COLUMNS",
    "SERVER_COLUMNS",
    "by_case",
    "columns_for",
    "heading",
    "reductions",
    "summary",
    "table",
    "verdict",
]

Row = dict[str, Any]

# (key, title) of the per-mode table's columns that both reports have
COLUMNS: tuple[tuple[str, str], ...] = (
    ("mode", "mode"),
    ("cost_pod_s", "cost (pod-s)"),
    ("mean_pods", "mean pods"),
    ("sla_violations_pct", "SLA viol. %"),
    ("p50_ms", "p50 ms"),
    ("p95_ms", "p95 ms"),
    ("p99_ms", "p99 ms"),
    ("mean_batch", "mean batch"),
    ("cold_starts", "cold starts"),
)

# A fixed or concurrency-limited server's (`bench/backends.py`): cost is busy worker-seconds,
# no pods, no cold starts; utilisation and the batches' requests it refused (429/503) instead.
SERVER_COLUMNS: tuple[tuple[str, str], ...] = (
    ("mode", "mode"),
    ("cost_pod_s", "cost (busy worker-s)"),
    ("utilisation_pct", "utilisation %"),
    ("sla_violations_pct", "SLA viol. %"),
    ("goodput_rps", "goodput req/s"),
    ("refused", "refused req."),
    ("p50_ms", "p50 ms"),
    ("p95_ms", "p95 ms"),
    ("p99_ms", "p99 ms"),
    ("mean_batch", "mean batch"),
)


def columns_for(
    rows: Sequence[Row], knative: Sequence[tuple[str, str]] = COLUMNS
) -> Sequence[tuple[str, str]]:
    """The columns for rows of one backend kind: `SERVER_COLUMNS` for a fixed or limited
    server's (they have `utilisation_pct`), else `knative` with goodput when the rows have it."""
    if rows and all("utilisation_pct" in r for r in rows):
        return SERVER_COLUMNS
    cols = list(knative)
    if rows and all("goodput_rps" in r for r in rows):
        cols.insert(
            cols.index(("sla_violations_pct", "SLA viol. %")) + 1, ("goodput_rps", "goodput req/s")
        )
    return cols


def heading(profile: str, trace: str) -> str:
    p = PROFILES[profile]
    return (
        f"#### {profile} (SLO {p.slo_ms:g} ms at p95, peak {p.peak_rps:g} req/s), trace {trace}\n"
    )


def by_case(rows: Sequence[Row]) -> dict[tuple[str, str], dict[str, Row]]:
    """Rows by (profile, trace), then by mode, in the order they came."""
    groups: dict[tuple[str, str], dict[str, Row]] = {}
    for row in rows:
        groups.setdefault((row["profile"], row["trace"]), {})[row["mode"]] = row
    return groups


def reductions(by_mode: dict[str, Row]) -> dict[str, float]:
    """Adaptive against off, in percent: cost and SLA violations (nan when off had none)."""
    off, ours = by_mode.get("off"), by_mode.get("adaptive")
    if off is None or ours is None:
        return {}

    def cut(key: str) -> float:
        return 100.0 * (1 - ours[key] / off[key]) if off[key] > 0 else math.nan

    return {"cost": cut("cost_pod_s"), "violations": cut("sla_violations_pct")}


def verdict(by_mode: dict[str, Row]) -> str:
    """Adaptive's SLA violations against aimd and static, and its cost against aimd."""
    ours = by_mode.get("adaptive")
    if ours is None:
        return ""
    parts = []
    for other in ("aimd", "static"):
        if other in by_mode:
            a, b = ours["sla_violations_pct"], by_mode[other]["sla_violations_pct"]
            parts.append(f"viol. {'fewer' if a < b else 'tie' if a == b else 'MORE'} vs {other}")
    if "aimd" in by_mode:
        cheaper = ours["cost_pod_s"] <= by_mode["aimd"]["cost_pod_s"]
        parts.append("cost " + ("not higher" if cheaper else "HIGHER") + " vs aimd")
    return ", ".join(parts)


def summary(rows: Sequence[Row], with_verdict: bool = False) -> str:
    """One line per profile and trace: every mode's cost and SLA violations, adaptive's cuts
    against off (and, `with_verdict`, how it compares with aimd and static)."""
    groups = by_case(rows)
    modes = [m for m in MODES if any(m in g for g in groups.values())]
    head = ["profile", "trace"]
    head += [f"cost {m}" for m in modes] + [f"viol % {m}" for m in modes]
    head += ["adaptive vs off: cost", "violations"]
    if with_verdict:
        head.append("adaptive vs aimd, static")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (profile, trace), case in groups.items():
        cells = [profile, trace]
        cells += [f"{case[m]['cost_pod_s']:g}" if m in case else "" for m in modes]
        cells += [f"{case[m]['sla_violations_pct']:g}" if m in case else "" for m in modes]
        cut = reductions(case)
        if cut:
            v = cut["violations"]
            cells.append(f"{-cut['cost']:+.1f}%")
            cells.append("n/a (off: 0)" if math.isnan(v) else f"{-v:+.1f}%")
        else:
            cells += ["", ""]
        if with_verdict:
            cells.append(verdict(case))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def table(rows: Sequence[Row], columns: Sequence[tuple[str, str]]) -> list[str]:
    """A markdown table of `rows`, `columns` being (key, title) pairs."""
    out = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(row[key]) for key, _ in columns) + " |" for row in rows]
    return out
