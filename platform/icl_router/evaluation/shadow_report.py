"""``icl-router shadow-report``: the live router against a shadow candidate, from the shadow log.

Per candidate (``serving/shadow.py`` writes the rows):

- ``agreement``: the share of requests where the candidate picked the live router's model;
- ``predicted_gain``: the mean, over requests, of the candidate's p of its own pick minus its p of the live
  pick (0 where they agree): what the candidate expects to win, in points of accuracy (x100 for percent);
  ``live_view_gain`` is the same switch seen by the live router's p (null where the candidate picked a
  model the live pool does not have);
- ``realised``: where outcomes are known (``--outcomes``: Parquet files or directories with a key column,
  ``query_id`` or ``request_id``, matched to a row's request id or query hash; ``model_id`` (or ``model``);
  and ``score`` or ``correct``: e.g. re-profiled traffic or feedback), the mean outcome of the candidate's
  pick minus the live pick's over the requests where both are known (a request where they agree needs only
  one), with both accuracies and the number of such requests;
- ``switches``: (live pick -> candidate pick) counts where they differ; ``errors``: rows the candidate
  could not decide (its router down).

Writes ``shadow_report.json`` and ``shadow_report.md`` to ``--output`` when given; prints the JSON.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from icl_router.errors import UserError


class ShadowReportError(UserError):
    pass


def _parquet_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.parquet") if not p.name.startswith("."))


def read_log(log_dir: str | Path) -> pa.Table:
    from icl_router.serving.shadow import SHADOW_SCHEMA

    root = Path(log_dir)
    if not root.exists():
        raise ShadowReportError(f"--log {root}: no such directory (the serve config's shadow.log_dir)")
    files = _parquet_files(root)
    if not files:
        raise ShadowReportError(f"--log {root}: no shadow rows (part-*.parquet) yet; routed requests write them every shadow.flush_s")
    tables = []
    for f in files:
        t = pq.read_table(f)
        missing = [n for n in ("request_id", "candidate", "live_model", "shadow_model") if n not in t.column_names]
        if missing:
            raise ShadowReportError(f"--log: {f} is not a shadow log shard: no columns {missing}")
        tables.append(t.select([n for n in SHADOW_SCHEMA.names if n in t.column_names]).cast(
            pa.schema([SHADOW_SCHEMA.field(n) for n in SHADOW_SCHEMA.names if n in t.column_names])))
    return pa.concat_tables(tables, promote_options="default")


def read_outcomes(paths: list[str]) -> dict[tuple[str, str], float]:
    """(key, model) -> mean score, from every Parquet file under ``paths``."""
    sums: dict[tuple[str, str], list[float]] = defaultdict(list)
    for p in paths:
        root = Path(p)
        if not root.exists():
            raise ShadowReportError(f"--outcomes {root}: no such file or directory")
        for f in _parquet_files(root):
            t = pq.read_table(f)
            cols = t.column_names
            key = next((c for c in ("query_id", "request_id") if c in cols), None)
            model = next((c for c in ("model_id", "model") if c in cols), None)
            values = [c for c in ("score", "correct") if c in cols]  # per row: score, else correct (feedback carries one of them)
            if key is None or model is None or not values:
                raise ShadowReportError(f"--outcomes: {f} needs a key (query_id or request_id), a model (model_id or model) "
                                        f"and an outcome (score or correct) column; it has {cols}")
            vals = [t.column(c).to_pylist() for c in values]
            for i, (k, m) in enumerate(zip(t.column(key).to_pylist(), t.column(model).to_pylist())):
                v = next((col[i] for col in vals if col[i] is not None), None)
                if k is not None and m is not None and v is not None:
                    sums[(str(k), str(m))].append(float(v))
    return {k: sum(v) / len(v) for k, v in sums.items()}


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 6) if xs else None


def report(table: pa.Table, outcomes: dict[tuple[str, str], float] | None = None) -> dict[str, Any]:
    outcomes = outcomes or {}
    rows = table.to_pylist()
    by: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by[r["candidate"]].append(r)
    out = {}
    for cand, rs in sorted(by.items()):
        decided = [r for r in rs if r["shadow_model"] is not None]
        agree = [bool(r["agree"]) for r in decided]
        pred = [0.0 if r["agree"] else float(r["predicted_gain"]) for r in decided if r["agree"] or r["predicted_gain"] is not None]
        live_view = []
        for r in decided:
            lp = json.loads(r["live_p"] or "{}")
            if r["agree"]:
                live_view.append(0.0)
            elif r["shadow_model"] in lp:
                live_view.append(lp[r["shadow_model"]] - lp[r["live_model"]])
        real_l, real_s = [], []
        for r in decided:
            def known(model: str, r: dict = r) -> float | None:
                for key in (r["request_id"], r.get("query_hash")):
                    if key is not None and (key, model) in outcomes:
                        return outcomes[(key, model)]
                return None

            o_l = known(r["live_model"])
            o_s = o_l if r["agree"] else known(r["shadow_model"])
            if o_l is not None and o_s is not None:
                real_l.append(o_l)
                real_s.append(o_s)
        switches = Counter(f"{r['live_model']} -> {r['shadow_model']}" for r in decided if not r["agree"])
        out[cand] = {
            "rows": len(rs),
            "decided": len(decided),
            "errors": len(rs) - len(decided),
            "agreement": _mean([float(a) for a in agree]),
            "predicted_gain": _mean(pred),
            "live_view_gain": _mean(live_view),
            "shadow_picks": dict(Counter(r["shadow_model"] for r in decided).most_common()),
            "live_picks": dict(Counter(r["live_model"] for r in decided).most_common()),
            "switches": dict(switches.most_common()),
            "realised": {
                "rows": len(real_l),
                "live_accuracy": _mean(real_l),
                "shadow_accuracy": _mean(real_s),
                "gain": None if not real_l else round(sum(real_s) / len(real_s) - sum(real_l) / len(real_l), 6),
            },
            "policies": sorted({f"{r['live_policy']} / {r['shadow_policy']}" for r in rs}),
        }
    return {"rows": len(rows), "candidates": out}


def render_md(result: dict[str, Any]) -> str:
    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.1f}"

    lines = [f"# Shadow report ({result['rows']} logged requests)", "",
             "| candidate | requests | decided | agreement % | predicted gain (pts) | live view (pts) | realised rows | live acc % | shadow acc % | realised gain (pts) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c, v in result["candidates"].items():
        r = v["realised"]
        lines.append(f"| {c} | {v['rows']} | {v['decided']} | {pct(v['agreement'])} | {pct(v['predicted_gain'])} | {pct(v['live_view_gain'])} | "
                     f"{r['rows']} | {pct(r['live_accuracy'])} | {pct(r['shadow_accuracy'])} | {pct(r['gain'])} |")
    for c, v in result["candidates"].items():
        if v["switches"]:
            lines += ["", f"{c}: switches (live -> candidate): " + ", ".join(f"{k} x{n}" for k, n in v["switches"].items())]
    return "\n".join(lines) + "\n"


def run_shadow_report(log_dir: str, outcomes: list[str] | None = None, output: str | None = None) -> dict[str, Any]:
    result = report(read_log(log_dir), read_outcomes(outcomes or []))
    result["log"] = str(log_dir)
    if output:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "shadow_report.json").write_text(json.dumps(result, indent=1))
        (out / "shadow_report.md").write_text(render_md(result))
        result["output"] = str(out)
    return result
