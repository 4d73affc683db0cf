"""report.json, report.md and the PNG plots of an evaluation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LABELS = {
    "icl-router": "ICL-Router (query as vector)",
    "icl-router-evidence": "ICL-Router, its evidence head alone (no LM forward)",
    "icl-router-text": "ICL-Router (query as text)",
    "random": "random model (expected)",
    "best-single": "best single model (picked on train)",
    "max-expert": "max expert (best per task; OOD: on test)",
    "knn": "kNN on query embeddings",
    "logreg": "logistic regression per model",
    "oracle": "oracle (any model right)",
}


def _ms(v: dict | None) -> str:
    return "–" if not v else f"{v['mean']:.1f} ± {v['std']:.1f}"


def markdown(r: dict[str, Any]) -> str:
    seeds = ", ".join(map(str, r["seeds"]))
    lines = [
        "# Evaluation report",
        "",
        f"Dataset `{r['dataset']}`, {len(r['models'])} models; train {r['n']['train']}, ID test {r['n']['id']}, OOD {r['n']['ood']} "
        f"queries; seeds {seeds} (mean ± std of routed accuracy, %). Took {r['seconds'] / 60:.1f} min.",
        "",
        "| method | ID | OOD |",
        "|---|---|---|",
    ]
    for m, v in r["methods"].items():
        lines.append(f"| {LABELS.get(m, m)} | {_ms(v.get('id'))} | {_ms(v.get('ood'))} |")
    if r.get("add_model"):
        lines += [
            "",
            "## Adding a model by its profile only (first seed, ID test)",
            "",
            "Router trained without the model, which is then added by its anchor outcomes only, vs the router trained with it.",
            "",
            "| model | routed acc. added | trained with it | pool without it | AUC added | AUC trained | picked % added | picked % trained |",
            "|---|---|---|---|---|---|---|---|",
        ]
        f = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731
        for a in r["add_model"]:
            lines.append(
                f"| {a['model']} | {a['acc_added']:.1f} | {a['acc_trained']:.1f} | {a['acc_without']:.1f} | {f(a['auc_added'])} | "
                f"{f(a['auc_trained'])} | {a['share_added']:.1f} | {a['share_trained']:.1f} |"
            )
    if r.get("k_sweep"):
        lines += ["", "## Accuracy vs number of anchors (first seed)", "", "| K | ID | OOD |", "|---|---|---|"]
        lines += [f"| {k['k']} | {k['id']:.1f} | {k['ood']:.1f} |" for k in r["k_sweep"]]
    if r.get("pool_sizes"):
        lines += ["", "## Accuracy vs pool size (first seed, ID test; the n best models on train)", "", "| n | ICL-Router | kNN | best single | oracle |", "|---|---|---|---|---|"]
        lines += [f"| {p['n']} | {p['icl-router']:.1f} | {p['knn']:.1f} | {p['best-single']:.1f} | {p['oracle']:.1f} |" for p in r["pool_sizes"]]
    rb = r.get("routerbench")
    if rb:
        lines += [
            "",
            f"## Cost/quality on RouterBench ({rb['n_test']} test queries)",
            "",
            "Margin policy (the cheapest model whose p is within the margin of the best) on each router's p; "
            "AIQ (RouterBench): mean quality of the non-decreasing convex hull over the single models' cost range "
            f"[{rb['cost_range'][0]:.2e}, {rb['cost_range'][1]:.2e}] $ per query.",
            "",
            "| router | AIQ |",
            "|---|---|",
        ]
        lines += [f"| {k} | {v:.1f} |" for k, v in rb["aiq"].items()]
        lines += ["", "| model | cost $/query | accuracy |", "|---|---|---|"]
        lines += [f"| {m} | {s['cost']:.2e} | {s['quality']:.1f} |" for m, s in sorted(rb["single"].items(), key=lambda x: x[1]["cost"])]
        lines.append(f"| oracle (cheapest right model) | {rb['oracle']['cost']:.2e} | {rb['oracle']['quality']:.1f} |")
    lines += ["", "Plots: " + ", ".join(f"`{p}`" for p in r.get("plots", []))]
    return "\n".join(lines) + "\n"


def plots(r: dict[str, Any], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)

    names = list(r["methods"])
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, part in enumerate(("id", "ood")):
        vals = [r["methods"][m].get(part, {"mean": 0, "std": 0}) for m in names]
        ax.bar([x + 0.4 * i for x in range(len(names))], [v["mean"] for v in vals], 0.4, yerr=[v["std"] for v in vals], label=part.upper())
    ax.set_xticks([x + 0.2 for x in range(len(names))], names, rotation=30, ha="right")
    ax.set_ylabel("routed accuracy (%)")
    ax.legend()
    save(fig, "methods.png")
    if r.get("k_sweep"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ks = [k["k"] for k in r["k_sweep"]]
        for part in ("id", "ood"):
            ax.plot(ks, [k[part] for k in r["k_sweep"]], "o-", label=f"ICL-Router {part.upper()}")
            if "knn" in r["methods"] and part in r["methods"]["knn"]:
                ax.axhline(r["methods"]["knn"][part]["mean"], ls="--", lw=1, color="C0" if part == "id" else "C1", label=f"kNN {part.upper()}")
        ax.set_xscale("log")
        ax.set_xlabel("anchors K")
        ax.set_ylabel("routed accuracy (%)")
        ax.legend(fontsize=7)
        save(fig, "accuracy_vs_k.png")
    if r.get("pool_sizes"):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        ns = [p["n"] for p in r["pool_sizes"]]
        for m in ("icl-router", "knn", "best-single", "oracle"):
            ax.plot(ns, [p[m] for p in r["pool_sizes"]], "o-", label=m)
        ax.set_xlabel("pool size")
        ax.set_ylabel("ID routed accuracy (%)")
        ax.legend(fontsize=7)
        save(fig, "accuracy_vs_pool.png")
    rb = r.get("routerbench")
    if rb:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, curve in rb["curves"].items():
            pts = sorted((p["cost"], p["quality"]) for p in curve)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=3, label=f"{name} (AIQ {rb['aiq'][name]:.1f})")
        for m, s in rb["single"].items():
            ax.scatter(s["cost"], s["quality"], marker="x", color="gray")
            ax.annotate(m, (s["cost"], s["quality"]), fontsize=6)
        ax.scatter(rb["oracle"]["cost"], rb["oracle"]["quality"], marker="*", color="k", label="oracle")
        ax.set_xscale("log")
        ax.set_xlabel("mean cost per query ($)")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7)
        save(fig, "routerbench_cost_quality.png")
    return made


def write_report(r: dict[str, Any], out: Path) -> None:
    r["plots"] = plots(r, out)
    (out / "report.json").write_text(json.dumps(r, indent=1, default=float))
    (out / "report.md").write_text(markdown(r))
