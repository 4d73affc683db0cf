"""report.json, report.md and the PNG plots of an evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

LABELS = {
    "icl-router": "ICL-Router (with its decision layer; queries name their task)",
    "icl-router-no-task": "ICL-Router, the same router and layer, queries routed without their task",
    "icl-router-evidence": "ICL-Router, its evidence head alone (no LM forward), same decision layer",
    "icl-router-raw": "ICL-Router, argmax without the decision layer",
    "icl-router-text": "ICL-Router (query as text)",
    "random": "random model (expected)",
    "best-single": "best single model (picked on train)",
    "max-expert": "max expert (best per task; OOD: on test)",
    "knn": "kNN on query embeddings",
    "knn-tuned": "tuned neighbour rule (k, m, delta on validation)",
    "knn-tuned-task": "tuned neighbour rule reading the query's task (its prior: the model's accuracy on that task)",
    "logreg": "logistic regression per model",
    "oracle": "oracle (any model right)",
}


def _ms(v: dict | None) -> str:
    return "–" if not v else f"{v['mean']:.1f} ± {v['std']:.1f}"


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if x is None else fmt.format(x)


def _bars(d: dict[str, float]) -> str:
    return " | ".join(_f(d.get(k), "{:+.1f}") for k in ("vs_best_single", "vs_knn_tuned", "vs_knn_tuned_task"))


def suite_table(r: dict[str, Any]) -> list[str]:
    """Per dataset and split: the router beside the bars it must clear."""
    cols = ["icl-router", "icl-router-no-task", "best-single", "knn-tuned", "knn-tuned-task", "max-expert", "knn", "logreg", "oracle"]
    lines = [
        "| dataset | split | " + " | ".join(cols) + " | router - best single | router - knn-tuned | router - knn-tuned-task |",
        "|---|---|" + "---|" * (len(cols) + 3),
    ]
    for name, rep in r["datasets"].items():
        m = rep["methods"]
        for part in ("id", "ood"):
            if part not in m.get("icl-router", {}):
                continue
            d = r["delta"][name][part]
            cells = [_ms(m.get(c, {}).get(part)) for c in cols]
            lines.append(f"| {name} | {part.upper()} | " + " | ".join(cells) + f" | {_bars(d)} |")
    if "mean" in r["delta"]:
        lines.append("| mean | all | " + " | ".join("" for _ in cols) + f" | {_bars(r['delta']['mean']['all'])} |")
    return lines


def markdown(r: dict[str, Any]) -> str:
    """report.md: the suite table, then one section per dataset and per experiment the report holds."""
    seeds = ", ".join(map(str, r["seeds"]))
    lines = [
        "# Evaluation report",
        "",
        f"{len(r['datasets'])} dataset(s), seeds {seeds}: routed accuracy (%), mean ± std over seeds. Took {r['seconds'] / 60:.1f} min.",
        "",
        "## Every dataset: the router beside the best single model and the tuned neighbour rule",
        "",
        *suite_table(r),
    ]
    for name, rep in r["datasets"].items():
        lines += dataset_section(name, rep)
    for key, section in (("add_model", add_model_section), ("k_sweep", k_sweep_section), ("pool_sizes", pool_section), ("routerbench", routerbench_section)):
        if r.get(key):
            lines += section(r[key])
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in r.get("plots", []))]
    return "\n".join(lines) + "\n"


def dataset_section(name: str, rep: dict[str, Any]) -> list[str]:
    """One dataset: every method's ID and OOD accuracy, the router's calibration and its decision layers."""
    lines = [
        "",
        f"## {name}",
        "",
        f"`{rep['dataset']}`, {len(rep['models'])} models, K={rep['k']} anchors; train {rep['n']['train']}, ID test {rep['n']['id']}, "
        f"OOD {rep['n']['ood']} queries ({rep.get('seconds', 0) / 60:.1f} min).",
        "",
        "| method | ID | OOD |",
        "|---|---|---|",
    ]
    lines += [f"| {LABELS.get(m, m)} | {_ms(v.get('id'))} | {_ms(v.get('ood'))} |" for m, v in rep["methods"].items()]
    cal = rep.get("calibration") or {}
    if cal:
        lines += [
            "",
            "Calibration of the router's p(correct) over every (query, model) pair, mean over seeds: before the decision "
            "layer -> after it; and the share of queries routed away from the default model.",
            "",
            "| split | ECE | Brier | routed away from the default |",
            "|---|---|---|---|",
        ]
        for part, c in cal.items():
            lines.append(f"| {part.upper()} | {c['ece_raw']:.3f} -> {c['ece']:.3f} | {c['brier_raw']:.3f} -> {c['brier']:.3f} | {c['away_from_default']:.1f}% |")
    dec = [(seed, d) for seed, d in (rep.get("decision") or {}).items() if d]
    if dec:
        lines += ["", "| seed | default | tau | prior_weight | min_gain | calibration | fitted on |", "|---|---|---|---|---|---|---|"]
        for seed, d in dec:
            lines.append(
                f"| {seed} | {d.get('default_model') or 'the best prior'} | {d['tau']} | {d['prior_weight']} | {d['min_gain']} "
                f"| ({d['calibration'][0]:.2f}, {d['calibration'][1]:.2f}) | {d['fitted'].get('rows', '–')} queries |"
            )
    return lines


def add_model_section(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "## Adding a model by its profile only (first dataset and seed, ID test)",
        "",
        "Router trained without the model, which is then added by its anchor outcomes only, vs the router trained with it.",
        "",
        "| model | routed acc. added | trained with it | pool without it | AUC added | AUC trained | picked % added | picked % trained |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in rows:
        lines.append(
            f"| {a['model']} | {a['acc_added']:.1f} | {a['acc_trained']:.1f} | {a['acc_without']:.1f} | {_f(a['auc_added'], '{:.3f}')} | "
            f"{_f(a['auc_trained'], '{:.3f}')} | {a['share_added']:.1f} | {a['share_trained']:.1f} |"
        )
    return lines


def k_sweep_section(rows: list[dict]) -> list[str]:
    lines = ["", "## Accuracy vs number of anchors (first dataset and seed)", "", "| K | ID | OOD |", "|---|---|---|"]
    return lines + [f"| {k['k']} | {_f(k.get('id'))} | {_f(k.get('ood'))} |" for k in rows]


def pool_section(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "## Accuracy vs pool size (first dataset and seed, ID test; the n best models on train)",
        "",
        "| n | ICL-Router | knn-tuned | kNN | best single | oracle |",
        "|---|---|---|---|---|---|",
    ]
    return lines + [f"| {p['n']} | {p['icl-router']:.1f} | {p['knn-tuned']:.1f} | {p['knn']:.1f} | {p['best-single']:.1f} | {p['oracle']:.1f} |" for p in rows]


def routerbench_section(rb: dict[str, Any]) -> list[str]:
    """The cost policy on RouterBench: AIQ and accuracy at a share of the reference model's cost, then each single model."""
    ref, ref_name = rb["reference"], rb["reference_model"]
    lines = [
        "",
        f"## Cost and quality on RouterBench ({rb['n_test']} test queries)",
        "",
        f"The cost policy (the highest p - cost_weight x cost, swept) on each router's p; {ref_name} answers {ref['quality']:.1f}% at "
        f"${ref['cost']:.2e} per query. AIQ (RouterBench): the mean quality of the non-decreasing convex hull over the single "
        f"models' cost range [{rb['cost_range'][0]:.2e}, {rb['cost_range'][1]:.2e}] $ per query; the single models' own hull: "
        f"**{rb['single_hull_aiq']:.1f}**.",
        "",
        f"| router | AIQ | AIQ - single hull | accuracy at 25% of {ref_name}'s cost | at 50% | cost to match {ref_name} |",
        "|---|---|---|---|---|---|",
    ]
    for k, v in rb["aiq"].items():
        match = rb["cost_to_match_gpt4"][k]
        match_s = "never" if match is None else f"${match:.2e} ({100 * match / ref['cost']:.0f}%)"
        lines.append(
            f"| {k} | {v:.1f} | {v - rb['single_hull_aiq']:+.1f} | {_f(rb['acc_at_25pct_gpt4_cost'][k])} | {_f(rb['acc_at_50pct_gpt4_cost'][k])} | {match_s} |"
        )
    lines += ["", "| model | cost $/query | accuracy |", "|---|---|---|"]
    lines += [f"| {m} | {s['cost']:.2e} | {s['quality']:.1f} |" for m, s in sorted(rb["single"].items(), key=lambda x: x[1]["cost"])]
    lines.append(f"| oracle (cheapest right model) | {rb['oracle']['cost']:.2e} | {rb['oracle']['quality']:.1f} |")
    return lines


def plots(r: dict[str, Any], out: Path) -> list[str]:
    """Every plot the report has data for, as PNG files in ``out``; their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    for name, plot in PLOTS.items():
        if name == "reliability.png":  # drawn by calibration's own plot
            curves = {n: rep["calibration"]["id"]["reliability"] for n, rep in r["datasets"].items() if rep.get("calibration", {}).get("id")}
            if curves:
                from icl_router.evaluation.calibration import plot_reliability

                plot_reliability(curves, str(out / name))
                made.append(name)
            continue
        fig = plot(r, plt)
        if fig is not None:
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            plt.close(fig)
            made.append(name)
    return made


def methods_plot(r: dict[str, Any], plt: Any) -> Any:
    names = list(r["methods"])
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, part in enumerate(("id", "ood")):
        vals = [r["methods"][m].get(part, {"mean": 0, "std": 0}) for m in names]
        ax.bar([x + 0.4 * i for x in range(len(names))], [v["mean"] for v in vals], 0.4, yerr=[v["std"] for v in vals], label=part.upper())
    ax.set_xticks([x + 0.2 for x in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("routed accuracy (%)")
    ax.legend()
    return fig


def suite_delta_plot(r: dict[str, Any], plt: Any) -> Any:
    rows = [(name, part, d) for name, parts in r["delta"].items() if name != "mean" for part, d in parts.items()]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(1.2 * len(rows) + 2, 3.6))
    x = np.arange(len(rows))
    for i, (key, label) in enumerate((("vs_best_single", "router - best single"), ("vs_knn_tuned", "router - knn-tuned"),
                                      ("vs_knn_tuned_task", "router - knn-tuned-task"))):
        ax.bar(x + 0.27 * (i - 1), [d.get(key, np.nan) for _, _, d in rows], 0.27, label=label)
    ax.axhline(0, color="k", lw=0.8)
    ax.axhline(-0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(x, [f"{n}\n{p.upper()}" for n, p, _ in rows], fontsize=8)
    return _labelled(fig, ax, y="routed accuracy difference (points)")


def k_sweep_plot(r: dict[str, Any], plt: Any) -> Any:
    if not r.get("k_sweep"):
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ks = [k["k"] for k in r["k_sweep"]]
    for part in ("id", "ood"):
        if any(part not in k for k in r["k_sweep"]):
            continue
        ax.plot(ks, [k[part] for k in r["k_sweep"]], "o-", label=f"ICL-Router {part.upper()}")
        if "knn" in r["methods"] and part in r["methods"]["knn"]:
            ax.axhline(r["methods"]["knn"][part]["mean"], ls="--", lw=1, color="C0" if part == "id" else "C1", label=f"kNN {part.upper()}")
    return _labelled(fig, ax, x="anchors K", y="routed accuracy (%)", log_x=True)


def pool_plot(r: dict[str, Any], plt: Any) -> Any:
    if not r.get("pool_sizes"):
        return None
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ns = [p["n"] for p in r["pool_sizes"]]
    for m in ("icl-router", "knn-tuned", "knn", "best-single", "oracle"):
        ax.plot(ns, [p[m] for p in r["pool_sizes"]], "o-", label=m)
    return _labelled(fig, ax, x="pool size", y="ID routed accuracy (%)")


def routerbench_plot(r: dict[str, Any], plt: Any) -> Any:
    rb = r.get("routerbench")
    if not rb:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in rb["curves"].items():
        pts = sorted((p["cost"], p["quality"]) for p in curve)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=f"{name} (AIQ {rb['aiq'][name]:.1f}; single hull {rb['single_hull_aiq']:.1f})")
    for m, s in rb["single"].items():
        ax.scatter(s["cost"], s["quality"], marker="x", color="gray")
        ax.annotate(m, (s["cost"], s["quality"]), fontsize=6)
    ax.scatter(rb["oracle"]["cost"], rb["oracle"]["quality"], marker="*", color="k", label="oracle")
    ref = rb["reference"]
    for frac in (0.25, 0.5):
        ax.axvline(frac * ref["cost"], color="grey", lw=0.6, ls=":")
    ax.axhline(ref["quality"], color="grey", lw=0.6, ls=":")
    return _labelled(fig, ax, x="mean cost per query ($)", y="accuracy (%)", log_x=True)


def _labelled(fig: Any, ax: Any, *, y: str, x: str | None = None, log_x: bool = False) -> Any:
    """``fig`` with its axes labelled and a small legend."""
    if log_x:
        ax.set_xscale("log")
    if x is not None:
        ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend(fontsize=7)
    return fig


# file name -> the plot (None when the report has no data for it), in the order the report lists them
PLOTS = {
    "methods.png": methods_plot,
    "suite_delta.png": suite_delta_plot,
    "reliability.png": None,
    "accuracy_vs_k.png": k_sweep_plot,
    "accuracy_vs_pool.png": pool_plot,
    "routerbench_cost_quality.png": routerbench_plot,
}


def write_report(r: dict[str, Any], out: Path) -> None:
    r["plots"] = plots(r, out)
    (out / "report.json").write_text(json.dumps(r, indent=1, default=float))
    (out / "report.md").write_text(markdown(r))
