// MLProxy's live page: polls the control plane's read API with a read token and draws
// policies, replicas, and per policy the latency against its SLA, the batch size and the
// arrival rate, from the replicas' heartbeats. No library, no inline script (the page's
// Content-Security-Policy allows only this file); every value is written as text, never
// as HTML, since policy names and replica records come from other writers.
"use strict";

(() => {
  const params = new URLSearchParams(window.location.search);
  const everyS = Math.min(60, Math.max(1, Number(params.get("refresh")) || 2));
  const keepMs = 5 * 60 * 1000;
  const history = new Map(); // policy -> [{t, rate, batch, latency}]
  const decisions = new Map(); // policy -> recent tuner decisions
  let decisionsAt = 0;
  let token = window.sessionStorage.getItem("mlproxy-token") || "";
  let timer = null;

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    for (const child of children) {
      // a node as a node; anything else as text (never parsed as HTML)
      node.append(child instanceof Node ? child : child === null || child === undefined ? "" : String(child));
    }
    return node;
  }

  function setStatus(text, bad) {
    const status = $("status");
    status.textContent = text;
    status.className = bad ? "error" : "";
  }

  class ApiError extends Error {
    constructor(message, auth) {
      super(message);
      this.auth = auth;
    }
  }

  async function api(path) {
    const resp = await fetch(path, {
      headers: { Authorization: "Bearer " + token },
      cache: "no-store",
      credentials: "omit",
    });
    if (resp.status === 401 || resp.status === 403) {
      throw new ApiError("The control plane refused the token (" + resp.status + ").", true);
    }
    if (!resp.ok) throw new ApiError(path + ": HTTP " + resp.status, false);
    return resp.json();
  }

  function num(x) {
    return typeof x === "number" && Number.isFinite(x) ? x : 0;
  }

  // The latency percentile shown against a policy's SLA: the smallest the heartbeats carry
  // that is at least the SLA's (p50, p95, p99), else p99.
  function latencyKey(policy) {
    const pct = num(policy.sla.percentile);
    return pct <= 50 ? "p50" : pct <= 95 ? "p95" : "p99";
  }

  // Per policy, over the replicas' heartbeats: arrivals summed, batch size weighted by
  // batches, each latency percentile the worst replica's (percentiles do not add up).
  function aggregate(replicas) {
    const out = new Map();
    for (const replica of replicas) {
      for (const [name, s] of Object.entries(replica.stats || {})) {
        const a = out.get(name) || { rate: 0, requests: 0, misses: 0, batches: 0, items: 0, latency: {} };
        a.rate += num(s.arrival_rate);
        a.requests += num(s.requests);
        a.misses += num(s.sla_misses);
        a.batches += num(s.batches);
        a.items += num(s.mean_batch_size) * num(s.batches);
        for (const key of ["p50", "p95", "p99"]) {
          const v = s.latency_ms ? s.latency_ms[key] : undefined;
          if (typeof v === "number" && Number.isFinite(v)) a.latency[key] = Math.max(a.latency[key] ?? 0, v);
        }
        out.set(name, a);
      }
    }
    for (const a of out.values()) a.batch = a.batches ? a.items / a.batches : 0;
    return out;
  }

  function latencyOf(a, policy) {
    const v = a ? a.latency[latencyKey(policy)] : undefined;
    return typeof v === "number" ? v : null;
  }

  function record(now, policies, agg) {
    const names = new Set(policies.map((p) => p.name));
    for (const name of history.keys()) if (!names.has(name)) history.delete(name);
    for (const p of policies) {
      const name = p.name;
      const a = agg.get(name);
      const points = history.get(name) || [];
      points.push({ t: now, rate: a ? a.rate : 0, batch: a ? a.batch : 0, latency: latencyOf(a, p) });
      while (points.length && points[0].t < now - keepMs) points.shift();
      history.set(name, points);
    }
  }

  function fixed(x, digits) {
    return x === null || x === undefined ? "-" : Number(x).toFixed(digits);
  }

  function renderPolicies(policies, statuses, agg) {
    const body = $("policies").tBodies[0];
    const rows = policies.map((p, i) => {
      const s = statuses[i];
      const a = agg.get(p.name);
      const rollout = s
        ? s.replicas ? s.converged + "/" + s.replicas + (s.complete ? " complete" : " rolling out") : "no replica"
        : "-";
      const sla = num(p.sla.latency_ms);
      const latency = latencyOf(a, p);
      const late = latency !== null && latency > sla;
      const row = el(
        "tr",
        { "data-policy": p.name },
        el("td", {}, p.name),
        el("td", {}, p.version),
        el("td", {}, p.batching.mode),
        el("td", {}, sla + " ms @ p" + p.sla.percentile),
        el("td", {}, p.match.path),
        el("td", { class: s && s.complete ? "good" : "" }, rollout),
        el("td", { "data-field": "rate" }, a ? fixed(a.rate, 1) : "0.0"),
        el("td", { "data-field": "batch" }, a ? fixed(a.batch, 1) : "-"),
        el(
          "td",
          { "data-field": "latency", class: late ? "bad" : "" },
          latency === null ? "-" : fixed(latency, 1) + " ms (" + latencyKey(p) + ")",
        ),
        el("td", { "data-field": "misses" }, a ? a.misses + " / " + a.requests : "-"),
      );
      return row;
    });
    body.replaceChildren(...rows);
  }

  function renderReplicas(replicas) {
    const body = $("replicas").tBodies[0];
    const now = Date.now();
    body.replaceChildren(
      ...replicas.map((r) => {
        const age = (now - Date.parse(r.heartbeat_at)) / 1000;
        const versions = Object.entries(r.policies || {})
          .map(([name, v]) => name + "@" + v)
          .join(", ");
        return el(
          "tr",
          { "data-replica": r.id },
          el("td", {}, r.id),
          el("td", {}, r.address),
          el("td", { "data-field": "heartbeat" }, Number.isFinite(age) ? Math.max(0, age).toFixed(0) + " s ago" : "-"),
          el("td", { class: r.source_ok ? "good" : "bad" }, r.source_ok ? "ok" : "unreachable"),
          el("td", {}, versions),
        );
      }),
    );
  }

  const SVG = "http://www.w3.org/2000/svg";

  function chart(label, series, points, key, limit) {
    const width = 360;
    const height = 60;
    const now = Date.now();
    const values = points.map((p) => p[key]).filter((v) => typeof v === "number");
    const top = Math.max(1e-9, ...values, limit || 0) * 1.15;
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("data-series", series);
    svg.setAttribute("data-points", String(values.length));
    svg.setAttribute("data-last", values.length ? String(values[values.length - 1]) : "");
    const x = (t) => width - ((now - t) / keepMs) * width;
    const y = (v) => height - (v / top) * height;
    if (limit) {
      const line = document.createElementNS(SVG, "line");
      line.setAttribute("class", "sla");
      line.setAttribute("x1", "0");
      line.setAttribute("x2", String(width));
      line.setAttribute("y1", String(y(limit)));
      line.setAttribute("y2", String(y(limit)));
      svg.append(line);
    }
    const poly = document.createElementNS(SVG, "polyline");
    poly.setAttribute(
      "points",
      points
        .filter((p) => typeof p[key] === "number")
        .map((p) => x(p.t).toFixed(1) + "," + y(p[key]).toFixed(1))
        .join(" "),
    );
    svg.append(poly);
    const last = values.length ? values[values.length - 1] : null;
    const box = el("div", { class: "chart" }, el("div", { class: "label" }, label + ": " + fixed(last, 1)));
    box.append(svg);
    return box;
  }

  function renderCharts(policies) {
    const cards = policies.map((p) => {
      const points = history.get(p.name) || [];
      const card = el("div", { class: "policy", "data-policy": p.name }, el("h3", {}, p.name));
      card.append(
        chart(
          "Latency " + latencyKey(p) + ", ms (dashed: SLA " + p.sla.latency_ms + " ms)",
          "latency",
          points,
          "latency",
          num(p.sla.latency_ms),
        ),
        chart("Batch size, instances", "batch", points, "batch", 0),
        chart("Arrivals, requests/s", "rate", points, "rate", 0),
      );
      const list = el("ul", { class: "decisions", "data-field": "decisions" });
      for (const d of decisions.get(p.name) || []) {
        const when = d.at ? new Date(d.at).toLocaleTimeString() : "";
        list.append(el("li", {}, when + " v" + d.version + ": " + (d.reason || JSON.stringify(d.changes))));
      }
      if (!list.children.length) list.append(el("li", {}, "no tuner decision yet"));
      card.append(el("div", { class: "label" }, "Fleet tuner's recent decisions"), list);
      return card;
    });
    $("charts").replaceChildren(...cards);
  }

  async function refresh() {
    try {
      const [pol, reps] = await Promise.all([api("/v1/policies"), api("/v1/replicas")]);
      const policies = pol.items || [];
      const replicas = reps.items || [];
      const statuses = await Promise.all(
        policies.map((p) => api("/v1/policies/" + encodeURIComponent(p.name) + "/status").catch(() => null)),
      );
      const now = Date.now();
      if (now - decisionsAt > 10000) {
        decisionsAt = now;
        await Promise.all(
          policies.map(async (p) => {
            try {
              const doc = await api("/v1/policies/" + encodeURIComponent(p.name) + "/decisions?limit=5");
              decisions.set(p.name, doc.items || []);
            } catch (err) {
              decisions.delete(p.name);
            }
          }),
        );
      }
      const agg = aggregate(replicas);
      record(now, policies, agg);
      renderPolicies(policies, statuses, agg);
      renderReplicas(replicas);
      renderCharts(policies);
      setStatus(
        "Updated " + new Date(now).toLocaleTimeString() + ": " + policies.length + " policies, " +
          replicas.length + " replicas (every " + everyS + " s)",
        false,
      );
    } catch (err) {
      setStatus(err.message || String(err), true);
      if (err.auth) stop();
    }
  }

  function stop() {
    if (timer !== null) window.clearInterval(timer);
    timer = null;
  }

  function start() {
    stop();
    if (!token) return;
    refresh();
    timer = window.setInterval(refresh, everyS * 1000);
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("span-min").textContent = String(keepMs / 60000);
    $("login").addEventListener("submit", (event) => {
      event.preventDefault();
      token = $("token").value.trim();
      $("token").value = "";
      window.sessionStorage.setItem("mlproxy-token", token);
      setStatus("Connecting...", false);
      start();
    });
    start();
  });
})();
