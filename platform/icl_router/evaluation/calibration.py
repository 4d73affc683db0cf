"""How far p(correct) can be taken at its word: reliability, ECE and Brier score.

Every (query, model) pair with a known outcome counts once; p is the decision
layer's (shrunk and calibrated) p, the one the cost policies trade against money.
"""

from __future__ import annotations

import numpy as np

BINS = 10


def _pairs(p: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    known = ~np.isnan(labels)
    return np.asarray(p, dtype=np.float64)[known], (labels[known] >= 0.5).astype(np.float64)


def reliability(p: np.ndarray, labels: np.ndarray, *, bins: int = BINS) -> list[dict]:
    """Equal-width bins of p: [{lo, hi, n, mean_p, frac_correct}] (empty bins left out)."""
    x, y = _pairs(p, labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(x, edges[1:-1]), 0, bins - 1)
    out = []
    for b in range(bins):
        sel = idx == b
        if sel.any():
            out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "n": int(sel.sum()), "mean_p": float(x[sel].mean()), "frac_correct": float(y[sel].mean())})
    return out


def ece(p: np.ndarray, labels: np.ndarray, *, bins: int = BINS) -> float:
    """Expected calibration error: the n-weighted mean |mean p - fraction correct| over the bins."""
    rel = reliability(p, labels, bins=bins)
    n = sum(r["n"] for r in rel)
    return float(sum(r["n"] * abs(r["mean_p"] - r["frac_correct"]) for r in rel) / max(n, 1))


def brier(p: np.ndarray, labels: np.ndarray) -> float:
    x, y = _pairs(p, labels)
    return float(np.mean((x - y) ** 2)) if len(x) else float("nan")


def summary(p: np.ndarray, labels: np.ndarray, choice: np.ndarray, default: int) -> dict:
    """{ece, brier, away_from_default (percent of queries), reliability} of one split part."""
    return {
        "ece": ece(p, labels),
        "brier": brier(p, labels),
        "away_from_default": float(100 * np.mean(np.asarray(choice) != default)),
        "reliability": reliability(p, labels),
    }


def plot_reliability(curves: dict[str, list[dict]], path: str) -> None:
    """One panel per name: the reliability diagram (fraction correct against mean p, dot size ~ n)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        rel = curves[name]
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        if rel:
            n = np.array([r["n"] for r in rel], dtype=float)
            ax.plot([r["mean_p"] for r in rel], [r["frac_correct"] for r in rel], color="C0", lw=1)
            ax.scatter([r["mean_p"] for r in rel], [r["frac_correct"] for r in rel], s=10 + 150 * n / n.max(), color="C0", zorder=3)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("p(correct)")
    axes[0][0].set_ylabel("fraction correct")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
