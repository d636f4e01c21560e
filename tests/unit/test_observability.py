"""The Grafana dashboard and the Prometheus rules in manifests/components/monitoring: every
metric they use is one the exporters register, their structure, and the rules' behaviour under
`promtool test rules` (tests/data/alerts_test.yaml)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest

from controlplane.adapters.memory import MemoryServer, MemoryStore
from controlplane.app import create_app
from controlplane.settings import Settings
from extproc.adapters.metrics import PrometheusMetrics

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "manifests" / "components" / "monitoring"
RULES = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
ALERT_TESTS = ROOT / "tests" / "data" / "alerts_test.yaml"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
BUILTINS = {"up"}  # series Prometheus itself writes for every target

# PromQL's functions and aggregation operators (Prometheus 2.x); a name followed by "(" that
# is not here is an error, so a misspelt function is caught too.
_FUNCTION_NAMES = """
    abs absent absent_over_time acos acosh asin asinh atan atanh avg_over_time ceil changes
    clamp clamp_max clamp_min cos cosh count_over_time day_of_month day_of_week day_of_year
    days_in_month deg delta deriv exp floor histogram_count histogram_fraction
    histogram_quantile histogram_stddev histogram_stdvar histogram_sum holt_winters hour idelta
    increase irate label_join label_replace last_over_time ln log10 log2 mad_over_time
    max_over_time min_over_time minute month pi predict_linear present_over_time
    quantile_over_time rad rate resets round scalar sgn sin sinh sort sort_desc sqrt
    stddev_over_time stdvar_over_time sum_over_time tan tanh time timestamp vector year
    sum min max avg group stddev stdvar count count_values bottomk topk quantile
    start end
    """
FUNCTIONS = frozenset(_FUNCTION_NAMES.split())
LABEL_LIST_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
KEYWORDS = frozenset({"bool", "and", "or", "unless", "offset", "atan2", "inf", "nan"})
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def _skip_string(expr: str, i: int) -> int:
    """Index just past the string literal that starts at expr[i]."""
    quote = expr[i]
    i += 1
    while i < len(expr):
        if expr[i] == "\\" and quote != "`":
            i += 2
            continue
        if expr[i] == quote:
            return i + 1
        i += 1
    raise ValueError(f"unterminated string in {expr!r}")


def _skip_group(expr: str, i: int, close: str) -> tuple[int, str]:
    """Index just past the bracket that closes the one at expr[i] (strings inside may hold
    any character), and what was between them."""
    start = i + 1
    i += 1
    while i < len(expr):
        if expr[i] in "\"'`":
            i = _skip_string(expr, i)
            continue
        if expr[i] == close:
            return i + 1, expr[start:i]
        i += 1
    raise ValueError(f"unclosed {expr[start - 1]!r} in {expr!r}")


def selectors(expr: str) -> list[tuple[str, str]]:
    """The metric names an expression selects, each with its label matchers' text ("" without
    braces). Skipped: strings, label matchers, range and subquery brackets, numbers and
    durations, Grafana variables, keywords, function names and the label lists of by, without,
    on, ignoring, group_left and group_right."""
    found: list[tuple[str, str]] = []
    i, n = 0, len(expr)
    while i < n:
        c = expr[i]
        if c.isspace():
            i += 1
        elif c == "#":  # a comment, to the end of the line
            end = expr.find("\n", i)
            i = n if end < 0 else end
        elif c in "\"'`":
            i = _skip_string(expr, i)
        elif c == "{":
            i, _ = _skip_group(expr, i, "}")
        elif c == "[":
            i, _ = _skip_group(expr, i, "]")
        elif c.isdigit() or (c == "." and i + 1 < n and expr[i + 1].isdigit()):
            while i < n and (expr[i].isalnum() or expr[i] in "._"):
                i += 1
        elif c == "$":  # a Grafana variable: $name or ${name}
            if expr.startswith("${", i):
                i = expr.index("}", i) + 1
            else:
                i += 1
                while i < n and (expr[i].isalnum() or expr[i] == "_"):
                    i += 1
        elif m := _IDENT.match(expr, i):
            word = m.group()
            i = m.end()
            j = i
            while j < n and expr[j].isspace():
                j += 1
            follows = expr[j] if j < n else ""
            if word.lower() in LABEL_LIST_KEYWORDS:
                if follows == "(":
                    i, _ = _skip_group(expr, j, ")")
            elif word.lower() in KEYWORDS or word in FUNCTIONS:
                pass
            elif follows == "(":
                raise ValueError(f"unknown function {word}() in {expr!r}")
            elif follows == "{":
                i, matchers = _skip_group(expr, j, "}")
                found.append((word, matchers))
            else:
                found.append((word, ""))
        else:
            i += 1
    return found


def metric_names(expr: str) -> set[str]:
    return {name for name, _ in selectors(expr)}


def exposition_names(text: str) -> set[str]:
    """Every series name a Prometheus text exposition can hold, from its TYPE lines."""
    names: set[str] = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\w+)$", text, re.MULTILINE):
        if kind == "counter":
            base = name.removesuffix("_total")
            names |= {base + "_total", base + "_created"}
        elif kind in ("histogram", "summary"):
            names |= {name + s for s in ("_sum", "_count", "_created")}
            names.add(name + "_bucket" if kind == "histogram" else name)
        else:
            names.add(name)
    return names


async def _controlplane_exposition() -> str:
    down = MemoryServer()
    down.down = True  # no store in this test: the store's metrics still say so
    app = create_app(Settings(redis_url="unused", admin_tokens=("a" * 16,)), MemoryStore(down))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
        r = await client.get("/metrics")
    assert r.status_code == 200
    assert "mlproxy_cp_redis_up 0.0" in r.text  # Redis unreachable: still answers, says so
    return r.text


@pytest.fixture(scope="module")
def rule_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return doc


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def rules_of(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for group in doc["spec"]["groups"]:
        yield from group["rules"]


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in query_panels(dashboard) for t in p["targets"]]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((.*),\s*\w+\)", var["definition"])
            assert m, var["definition"]
            exprs.append(m.group(1))
    return exprs


@pytest.fixture(scope="module")
def known_names(rule_doc: dict[str, Any]) -> set[str]:
    """What the exporters register (ext_proc's metrics class, the control plane's real
    /metrics), the recording rules defined in the PrometheusRule, and Prometheus's own."""
    extproc = generate_latest(PrometheusMetrics(CollectorRegistry()).registry).decode()
    controlplane = asyncio.run(_controlplane_exposition())
    recorded = {r["record"] for r in rules_of(rule_doc) if "record" in r}
    return exposition_names(extproc) | exposition_names(controlplane) | recorded | BUILTINS


def unknown_names(exprs: list[str], known: set[str]) -> dict[str, set[str]]:
    return {e: bad for e in exprs if (bad := metric_names(e) - known)}


# --- the tokenizer itself


def test_selectors_skip_functions_keywords_label_lists_strings_and_durations() -> None:
    expr = """
        1 - sum by (policy, le) (rate(a_total{job="x", policy=~"$p", q="b{c}"}[$__rate_interval]))
          / on (policy) group_left (target) max without (pod) (b:rec:ratio offset 5m)
          > bool 0.95 unless count(c) or vector(1e-3) and absent(d{e="f"} == 1)  # g_h comment
        + histogram_quantile(0.99, sum(rate(e_bucket[5m:1m])) by (le)) * Inf
    """
    assert selectors(expr) == [
        ("a_total", 'job="x", policy=~"$p", q="b{c}"'),
        ("b:rec:ratio", ""),
        ("c", ""),
        ("d", 'e="f"'),
        ("e_bucket", ""),
    ]


def test_a_misspelt_function_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"unknown function rat\(\)"):
        metric_names("sum(rat(a_total[5m]))")


def test_a_misspelt_metric_is_caught(known_names: set[str], rule_doc: dict[str, Any]) -> None:
    exprs = [r["expr"] for r in rules_of(rule_doc)]
    broken = [e.replace("mlproxy_sla_misses_total", "mlproxy_sla_miss_total") for e in exprs]
    assert unknown_names(exprs, known_names) == {}
    assert {n for bad in unknown_names(broken, known_names).values() for n in bad} == {
        "mlproxy_sla_miss_total"
    }


def test_exposition_names_expand_counters_and_histograms(known_names: set[str]) -> None:
    assert {
        "mlproxy_requests_total",
        "mlproxy_request_latency_seconds_bucket",
        "mlproxy_request_latency_seconds_count",
        "mlproxy_policy_sla_percentile",
        "mlproxy_policy_sla_latency_seconds",
        "mlproxy_cp_requests_total",
        "mlproxy_cp_redis_up",
        "mlproxy_policy_store_generation",
        "mlproxy_policy_store_resets_total",
        "mlproxy_policy_store_carried_policies",
        "mlproxy_cp_store_generation",
        "mlproxy_cp_store_resets_total",
        "mlproxy_cp_store_published",
    } <= known_names
    assert "mlproxy_requests" not in known_names


# --- every metric the rules and the dashboard use exists


def test_every_metric_in_the_rules_exists(rule_doc: dict[str, Any], known_names: set[str]) -> None:
    assert unknown_names([r["expr"] for r in rules_of(rule_doc)], known_names) == {}


def test_every_metric_in_the_dashboard_exists(
    dashboard: dict[str, Any], known_names: set[str]
) -> None:
    assert unknown_names(dashboard_exprs(dashboard), known_names) == {}


def test_every_scraped_series_is_selected_by_its_job(
    rule_doc: dict[str, Any], dashboard: dict[str, Any]
) -> None:
    """Other jobs may export an `up` or even an mlproxy_* series: every selector of a scraped
    metric names the job (recording rules already do)."""
    exprs = [r["expr"] for r in rules_of(rule_doc)] + dashboard_exprs(dashboard)
    for expr in exprs:
        for name, matchers in selectors(expr):
            if ":" in name:  # a recording rule
                continue
            if name.startswith("mlproxy_cp_"):
                jobs = ["mlproxy-controlplane"]
            elif name.startswith("mlproxy_"):
                jobs = ["mlproxy-extproc"]
            else:
                jobs = ["mlproxy-extproc", "mlproxy-controlplane"]
            assert any(f'job="{job}"' in matchers for job in jobs), (name, expr)


# --- the dashboard


def test_dashboard_identity_and_variables(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "mlproxy-overview"
    assert dashboard["title"] == "MLProxy"
    assert "mlproxy" in dashboard["tags"]
    assert dashboard["schemaVersion"] >= 39
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    policy = variables["policy"]
    assert policy["type"] == "query" and policy["datasource"] == DATASOURCE
    assert policy["definition"].startswith("label_values(mlproxy_policy_version")
    assert policy["query"]["query"] == policy["definition"]
    assert policy["multi"] and policy["includeAll"]
    # One install at a time: two namespaces' replicas are never summed together.
    namespace = variables["namespace"]
    assert namespace["definition"].startswith("label_values(mlproxy_policy_version")
    assert not namespace["multi"] and not namespace["includeAll"]
    assert 'namespace="$namespace"' in policy["definition"]


def test_every_dashboard_query_is_scoped_to_the_chosen_namespace(
    dashboard: dict[str, Any],
) -> None:
    for panel in query_panels(dashboard):
        for target in panel["targets"]:
            for name, matchers in selectors(target["expr"]):
                assert 'namespace="$namespace"' in matchers, (panel["title"], name)


def test_dashboard_panels(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: set[tuple[int, int]] = set()
    for p in dashboard["panels"]:
        pos = p["gridPos"]
        assert {"h", "w", "x", "y"} <= pos.keys(), p["title"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, p["title"]
        mine = {
            (x, y)
            for x in range(pos["x"], pos["x"] + pos["w"])
            for y in range(pos["y"], pos["y"] + pos["h"])
        }
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
    for p in query_panels(dashboard):
        assert p["datasource"] == DATASOURCE, p["title"]
        assert p["targets"] and p.get("description"), p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == DATASOURCE, p["title"]
            assert t["expr"].strip(), p["title"]
    for p in dashboard["panels"]:
        if p["type"] == "row":
            assert "targets" not in p


def test_dashboard_shows_what_operators_need(dashboard: dict[str, Any]) -> None:
    used = {n for e in dashboard_exprs(dashboard) for n in metric_names(e)}
    assert {
        "mlproxy_sla_misses_total",
        "mlproxy_request_latency_seconds_count",
        "mlproxy_policy_sla_percentile",
        "mlproxy_policy_sla_latency_seconds",
        "mlproxy_request_latency_seconds_bucket",
        "mlproxy_requests_total",
        "mlproxy_batch_size_bucket",
        "mlproxy_batch_size_sum",
        "mlproxy_queue_wait_seconds_bucket",
        "mlproxy_backend_latency_seconds_bucket",
        "mlproxy_queue_depth",
        "mlproxy_in_flight_limit",
        "up",
        "mlproxy_policy_version",
        "mlproxy_policy_source_up",
        "mlproxy_cp_redis_up",
        "mlproxy_event_loop_lag_seconds_bucket",
        "mlproxy_gc_pause_seconds_bucket",
        "mlproxy_policy_store_generation",
        "mlproxy_policy_store_carried_policies",
        "mlproxy_policy_store_resets_total",
        "mlproxy_cp_store_resets_total",
        "mlproxy_inbound_delay_seconds_bucket",
        "mlproxy_outside_allowance_seconds",
        "mlproxy_request_time_fallbacks_total",
    } <= used


# --- the PrometheusRule


def test_prometheus_rule_structure(rule_doc: dict[str, Any]) -> None:
    assert rule_doc["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule_doc["kind"] == "PrometheusRule"
    meta = rule_doc["metadata"]
    assert meta["namespace"] == "mlproxy" and meta["name"]
    assert meta["labels"] == {
        "app.kubernetes.io/name": "mlproxy",
        "app.kubernetes.io/part-of": "mlproxy",
    }
    names: list[str] = []
    for group in rule_doc["spec"]["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert ("record" in rule) != ("alert" in rule), rule
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            if "record" in rule:
                assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), rule
                names.append(rule["record"])
                continue
            names.append(rule["alert"])
            assert re.fullmatch(r"MLProxy[A-Za-z]+", rule["alert"])
            assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
            assert rule["labels"]["severity"] in ("critical", "warning", "info"), rule["alert"]
            assert len(rule["annotations"]["summary"]) > 20, rule["alert"]
            assert len(rule["annotations"]["description"]) > 100, rule["alert"]
    assert len(names) == len(set(names))
    assert {
        "MLProxySLAGoodputBelowTarget",
        "MLProxyReplicasNotConverged",
        "MLProxyRedisUnreachable",
        "MLProxyExtprocDown",
        "MLProxyPolicyStoreReset",
        "MLProxyBackendStrayBytes",
    } <= set(names)


# --- promtool: the rules load, and behave as tests/data/alerts_test.yaml says


def promtool() -> str:
    candidates = [os.environ.get("PROMTOOL"), str(ROOT / ".tools" / "bin" / "promtool")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    found = shutil.which("promtool")
    if found:
        return found
    message = (
        "promtool not found: run tests/tools/get-promtool (it unpacks Debian's prometheus "
        "package into .tools/bin), or set PROMTOOL"
    )
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def write_rules(spec: dict[str, Any], where: Path) -> Path:
    path = where / "rules.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_promtool_checks_the_rules(rule_doc: dict[str, Any], tmp_path: Path) -> None:
    write_rules(rule_doc["spec"], tmp_path)
    r = run_promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(list(rules_of(rule_doc)))} rules found" in r.stdout


def test_promtool_unit_tests_of_the_alerts(rule_doc: dict[str, Any], tmp_path: Path) -> None:
    write_rules(rule_doc["spec"], tmp_path)
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    r = run_promtool("test", "rules", ALERT_TESTS.name, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_alert_tests_fail_if_goodput_ignored_the_policys_own_target(
    rule_doc: dict[str, Any], tmp_path: Path
) -> None:
    """A fixed 0.8 instead of each policy's target: iris (90% of a 95% target) would not fire,
    and the tests say so."""
    spec = json.loads(json.dumps(rule_doc["spec"]))
    for rule in rules_of({"spec": spec}):
        if rule.get("alert") == "MLProxySLAGoodputBelowTarget":
            rule["expr"] = "namespace_policy:mlproxy_sla_goodput:ratio_rate5m < 0.8"
    write_rules(spec, tmp_path)
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    r = run_promtool("test", "rules", ALERT_TESTS.name, cwd=tmp_path)
    assert r.returncode != 0
    assert "alertname: MLProxySLAGoodputBelowTarget, time: 10m" in r.stdout + r.stderr


def test_promtool_parses_every_dashboard_expression(
    dashboard: dict[str, Any], tmp_path: Path
) -> None:
    """Each query, with Grafana's variables filled in, as a recording rule: promtool parses
    and checks it."""
    rules = []
    for p in query_panels(dashboard):
        for t in p["targets"]:
            expr = (
                t["expr"]
                .replace("$__rate_interval", "5m")
                .replace("$policy", ".*")
                .replace("$namespace", "mlproxy")
            )
            assert "$" not in expr, expr
            rules.append(
                {"record": f"dashboard:panel_{p['id']}:{t['refId'].lower()}", "expr": expr}
            )
    write_rules({"groups": [{"name": "dashboard", "rules": rules}]}, tmp_path)
    r = run_promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
