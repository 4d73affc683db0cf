"""kNN on the profile alone: how well do the K anchors route? (README: evaluate)

Each model's outcomes on the anchors nearest the query (top-k mean, or a softmax over
cosine similarity at temperature tau) against kNN over the whole train split, on the
standard protocol's seeds with each seed's own anchors. This is what
``router.anchor_evidence`` starts from (model/evidence.py: tau 0.1). Run after
`icl-router evaluate --config jobs/evaluate/standard.yaml` has imported and embedded the data:

    .venv/bin/python docs/analysis/anchor_knn.py runs/cache/evaluate/llmrouter-llmrouter-*/
"""

import sys

import numpy as np

from icl_router.config import EvaluateConfig, load_config
from icl_router.data.dataset import Dataset
from icl_router.evaluation import fit as F
from icl_router.evaluation.baselines import knn, routed_accuracy
from icl_router.evaluation.run import dense

cfg = load_config(EvaluateConfig, "jobs/evaluate/standard.yaml", [])
rs0, queries = dense(Dataset(sys.argv[1]), embedder=cfg.embedder, split=cfg.split)
e = rs0.embeddings / np.linalg.norm(rs0.embeddings, axis=1, keepdims=True)
res: dict[tuple, list[float]] = {}
for seed in cfg.seeds:
    for K in (100, 250, 500):
        rs = F.for_seed(rs0, queries, cfg.split, seed=seed, k=K)
        A, prof, tr = rs.anchor_rows, rs.profiles().astype(float), rs.rows("train")  # prof [M, K]
        tie = 1e-6 * prof.mean(1)  # ties go to the model right most often on the anchors
        for part in ("test", "ood"):
            rows = rs.rows(part)
            sim = e[rows] @ e[A].T  # [n, K]
            order = np.argsort(-sim, 1)
            for k in (20, 50):
                res.setdefault((part, K, f"top-{k} anchors"), []).append(routed_accuracy(prof.T[order[:, :k]].mean(1) + tie, rs.labels[rows]))
            for tau in (0.05, 0.1):
                w = np.exp((sim - sim.max(1, keepdims=True)) / tau)
                res.setdefault((part, K, f"softmax tau={tau}"), []).append(routed_accuracy((w / w.sum(1, keepdims=True)) @ prof.T + tie, rs.labels[rows]))
            res.setdefault((part, K, "kNN k=20 over all of train"), []).append(routed_accuracy(knn(rs.embeddings[tr], rs.labels[tr], rs.embeddings[rows], k=20), rs.labels[rows]))
for (part, K, name), v in sorted(res.items()):
    print(f"{part:4s} K={K:3d} {name:28s} {np.mean(v):.1f} ± {np.std(v):.1f}  {[round(x, 1) for x in v]}")
