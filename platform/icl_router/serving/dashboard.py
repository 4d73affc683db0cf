"""The dashboard: one list of panels, read two ways from the same exported metrics.

- ``grafana_dashboard()``: the Grafana dashboard JSON (PromQL over the ``ray_``-prefixed series Ray
  exports), committed as ``cluster/grafana/icl-router.json`` (a unit test keeps the file equal to it).
- ``GET /dashboard`` (admin key): a status page the ingress renders from the same series, scraped from
  every node's metrics port (``scrape``), as totals since the service started (Grafana shows rates
  over time; the page has no time-series store). Pure HTML and CSS: no script, nothing fetched.

``PANELS`` names every metric each panel reads (``metric_names``); the serve test checks each of them
against /metrics after traffic.
"""

from __future__ import annotations

import html
import math
import re
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

P = "ray_icl_router_"  # Ray's exporter prefix + ours
RATE = "[$__rate_interval]"


@dataclass(frozen=True)
class Panel:
    key: str
    title: str
    unit: str
    targets: tuple[tuple[str, str], ...]  # (PromQL, legend)
    description: str
    kind: str = "timeseries"


PANELS: tuple[Panel, ...] = (
    Panel("traffic", "Traffic share per model", "percentunit", (
        (f'sum by (model) (rate({P}answers_total{{status="ok"}}{RATE})) / scalar(sum(rate({P}answers_total{{status="ok"}}{RATE})))', "{{model}}"),
    ), "Share of answered requests by the model that answered (routed and direct)."),
    Panel("latency", "Routed vs direct latency", "ms", (
        (f"histogram_quantile(0.5, sum by (route, le) (rate({P}request_latency_ms_bucket{RATE})))", "p50 {{route}}"),
        (f"histogram_quantile(0.95, sum by (route, le) (rate({P}request_latency_ms_bucket{RATE})))", "p95 {{route}}"),
    ), "Ingress time to the pool model's answer (streaming: first chunk): routed requests include the router call."),
    Panel("status", "Responses: 2xx / 4xx / 5xx", "reqps", (
        (f'sum(rate({P}requests_total{{code=~"2.."}}{RATE}))', "2xx"),
        (f'sum(rate({P}requests_total{{code=~"4.."}}{RATE}))', "4xx"),
        (f'sum(rate({P}requests_total{{code=~"5.."}}{RATE}))', "5xx"),
    ), "Every response of the ingress by HTTP status class."),
    Panel("circuits", "Open circuits", "short", (
        (f"max({P}open_circuits)", "open circuits"),
    ), "Parts (pool models, the router) the ingress skips now; the worst replica."),
    Panel("accuracy", "Outcome accuracy per model", "percentunit", (
        (f"sum by (model) (increase({P}outcome_score_total[1h])) / sum by (model) (increase({P}outcomes_total[1h]))", "outcomes {{model}}"),
        (f"max by (model) ({P}prior_accuracy)", "anchors {{model}}"),
    ), "Graded outcomes of answered requests (feedback, re-profiled traffic) beside each model's accuracy on the anchors."),
    Panel("spend", "Spend per key", "currencyUSD", (
        (f"sum by (key) (increase({P}spend_total[1h]))", "{{key}}"),
    ), "Spend in the pool's cost units (the answering model's cost per query), by API key name, per hour."),
)

METRIC = re.compile(r"\b(ray_icl_router_[a-z_]+)")


def metric_names(panels: tuple[Panel, ...] = PANELS) -> list[str]:
    """Every metric series name the panels read (a histogram's ``_bucket`` as it is exported)."""
    return sorted({m for p in panels for expr, _ in p.targets for m in METRIC.findall(expr)})


def grafana_dashboard() -> dict:
    """The Grafana dashboard (schema 39) over a Prometheus data source chosen at import (``DS_PROMETHEUS``)."""
    ds = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    panels = []
    for i, p in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": p.kind, "title": p.title, "description": p.description, "datasource": ds,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": p.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}, "tooltip": {"mode": "multi"}},
            "targets": [{"refId": chr(65 + j), "datasource": ds, "expr": expr, "legendFormat": legend} for j, (expr, legend) in enumerate(p.targets)],
        })
    return {
        "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus"}],
        "title": "ICL-Router", "uid": "icl-router", "tags": ["icl-router", "ray-serve"], "schemaVersion": 39, "version": 1,
        "editable": True, "refresh": "30s", "time": {"from": "now-1h", "to": "now"}, "timezone": "utc", "panels": panels,
        "templating": {"list": []}, "annotations": {"list": []},
    }


# ---- the status page: the same series, read from /metrics text ---------------------------------------


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text -> {series name: [(labels, value)]} (our series only)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list] = defaultdict(list)
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name.startswith(P):
                out[s.name].append((dict(s.labels), float(s.value)))
    return out


def _sum_by(series: list, label: str, where: dict[str, str] | None = None) -> dict[str, float]:
    out: dict[str, float] = defaultdict(float)
    for labels, v in series:
        if where and any(not re.fullmatch(pat, labels.get(k, "")) for k, pat in where.items()):
            continue
        out[labels.get(label, "")] += v
    return dict(out)


def _quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile on cumulative buckets {le: count}."""
    les = sorted(buckets)
    if not les or buckets[les[-1]] <= 0:
        return None
    total, prev_le, prev_c = buckets[les[-1]], 0.0, 0.0
    rank = q * total
    for le in les:
        c = buckets[le]
        if c >= rank:
            if math.isinf(le):
                return prev_le
            return prev_le + (le - prev_le) * (rank - prev_c) / max(c - prev_c, 1e-12)
        prev_le, prev_c = le, c
    return les[-1]


def panel_values(series: dict[str, list]) -> dict[str, Any]:
    """What each panel shows on the status page, from parsed series (totals since start)."""
    answers = _sum_by(series.get(P + "answers_total", []), "model", {"status": "ok"})
    n = sum(answers.values())
    latency: dict[str, dict] = {}
    by_route: dict[str, dict[float, float]] = defaultdict(lambda: defaultdict(float))
    for labels, v in series.get(P + "request_latency_ms_bucket", []):
        by_route[labels.get("route", "")][float(labels["le"])] += v
    for route, b in sorted(by_route.items()):
        latency[route] = {"p50": _quantile(0.5, b), "p95": _quantile(0.95, b), "n": max(b.values())}
    codes = _sum_by(series.get(P + "requests_total", []), "code")
    status = {cls: sum(v for c, v in codes.items() if c[:1] == cls[0]) for cls in ("2xx", "4xx", "5xx")}
    circuits = max((v for _, v in series.get(P + "open_circuits", [])), default=0.0)
    outcomes = _sum_by(series.get(P + "outcomes_total", []), "model")
    score = _sum_by(series.get(P + "outcome_score_total", []), "model")
    prior = {}
    for labels, v in series.get(P + "prior_accuracy", []):
        prior[labels.get("model", "")] = max(v, prior.get(labels.get("model", ""), 0.0))
    accuracy = {m: {"outcomes": (score.get(m, 0.0) / outcomes[m]) if outcomes.get(m) else None, "n": outcomes.get(m, 0.0), "anchors": prior.get(m)}
                for m in sorted(set(outcomes) | set(prior))}
    spend = _sum_by(series.get(P + "spend_total", []), "key")
    return {
        "traffic": {m: {"share": v / n if n else 0.0, "answers": v} for m, v in sorted(answers.items(), key=lambda kv: -kv[1])},
        "latency": latency, "status": status, "circuits": circuits, "accuracy": accuracy,
        "spend": dict(sorted(spend.items(), key=lambda kv: -kv[1])),
    }


def scrape(urls: list[str] | None = None, timeout_s: float = 5.0) -> str:
    """Every live node's exported metrics (Ray's metrics export port), concatenated; ``urls`` to read others."""
    import urllib.request

    if urls is None:
        import ray

        urls = [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]
    parts = []
    for u in urls:
        try:
            with urllib.request.urlopen(u, timeout=timeout_s) as r:
                parts.append(r.read().decode())
        except OSError:
            continue  # a node going away: the others still show
    return "\n".join(parts)


# ---- HTML ------------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;background:#111217;color:#d8d9da}
header{padding:14px 22px;background:#181b1f;border-bottom:1px solid #2c3235}
h1{font-size:18px;margin:0}header span{color:#8e8e8e;font-size:12px;margin-left:12px}
main{display:grid;grid-template-columns:1fr 1fr;gap:14px;padding:14px 22px}
section{background:#181b1f;border:1px solid #2c3235;border-radius:4px;padding:12px 14px;min-height:150px}
h2{font-size:14px;margin:0 0 4px}p.d{color:#8e8e8e;font-size:11px;margin:0 0 10px}
.row{display:grid;grid-template-columns:150px 1fr 90px;align-items:center;gap:8px;font-size:12px;margin:5px 0}
.bar{height:14px;background:#22252b;border-radius:2px;overflow:hidden}.bar i{display:block;height:100%}
.big{font-size:40px;font-weight:600}.muted{color:#8e8e8e;font-size:12px}
.c0{background:#73bf69}.c1{background:#5794f2}.c2{background:#ff9830}.c3{background:#f2495c}.c4{background:#b877d9}.c5{background:#fade2a}
"""


def _bar(label: str, frac: float, text: str, color: int) -> str:
    w = max(0.0, min(1.0, frac)) * 100
    return (f'<div class="row"><span>{html.escape(label)}</span><div class="bar"><i class="c{color % 6}" style="width:{w:.1f}%"></i></div>'
            f"<span>{html.escape(text)}</span></div>")


def _fmt(x: float | None, unit: str = "") -> str:
    return "-" if x is None else f"{x:.1f}{unit}" if unit == " ms" else f"{x:.4g}{unit}"


def render(values: dict[str, Any], *, title: str = "ICL-Router", generated: float | None = None) -> str:
    """The status page (HTML) of ``panel_values``."""
    body = {}
    t = values["traffic"]
    body["traffic"] = "".join(_bar(m, v["share"], f"{100 * v['share']:.0f}% ({v['answers']:.0f})", i) for i, (m, v) in enumerate(t.items())) or \
        '<p class="muted">no answer yet</p>'
    lat = values["latency"]
    top = max([v["p95"] or 0 for v in lat.values()] + [1e-9])
    body["latency"] = "".join(
        _bar(f"{route} p50", (v["p50"] or 0) / top, _fmt(v["p50"], " ms"), 1) + _bar(f"{route} p95", (v["p95"] or 0) / top, _fmt(v["p95"], " ms"), 2)
        for route, v in lat.items()) or '<p class="muted">no answer yet</p>'
    st = values["status"]
    n = sum(st.values()) or 1
    body["status"] = "".join(_bar(c, v / n, f"{v:.0f}", i if c == "2xx" else (2 if c == "4xx" else 3)) for i, (c, v) in enumerate(st.items()))
    circ = values["circuits"]
    body["circuits"] = f'<div class="big" style="color:{"#f2495c" if circ else "#73bf69"}">{circ:.0f}</div><p class="muted">parts skipped now</p>'
    acc = values["accuracy"]
    rows = []
    for m, v in acc.items():
        if v["outcomes"] is not None:
            rows.append(_bar(f"{m} outcomes", v["outcomes"], f"{100 * v['outcomes']:.0f}% (n={v['n']:.0f})", 0))
        if v["anchors"] is not None:
            rows.append(_bar(f"{m} anchors", v["anchors"], f"{100 * v['anchors']:.0f}%", 4))
    body["accuracy"] = "".join(rows) or '<p class="muted">no outcome yet</p>'
    sp = values["spend"]
    top_s = max(list(sp.values()) + [1e-12])
    body["spend"] = "".join(_bar(k, v / top_s, f"{v:.4g}", 5) for k, v in sp.items()) or '<p class="muted">no spend yet</p>'
    sections = "".join(f'<section id="{p.key}"><h2>{html.escape(p.title)}</h2><p class="d">{html.escape(p.description)}</p>{body[p.key]}</section>'
                       for p in PANELS)
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(generated if generated is not None else time.time()))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head><body>"
            f"<header><h1>{html.escape(title)}</h1><span>totals since start, from the exported metrics; {when}</span></header>"
            f"<main>{sections}</main></body></html>")
