"""How far can routing on MiniLM embeddings go on the standard protocol? (README: evaluate)

An optimistic ceiling for embedding-only routers: kNN shrunk towards the train
prior, and a task classifier's soft per-task accuracy table (max expert without
the task label), each with its grid picked on the test rows themselves
(mean of seeds 0-2). Run after `icl-router evaluate --config jobs/evaluate/standard.yaml`
has imported and embedded the data:

    .venv/bin/python docs/analysis/embedding_ceiling.py runs/cache/evaluate/llmrouter-llmrouter-*/
"""

import sys

import numpy as np
from sklearn.linear_model import LogisticRegression

from icl_router.config import EvaluateConfig, load_config
from icl_router.data.dataset import Dataset
from icl_router.data.splits import make_split
from icl_router.evaluation.baselines import routed_accuracy
from icl_router.evaluation.run import dense

cfg = load_config(EvaluateConfig, "jobs/evaluate/standard.yaml", [])
ds = Dataset(sys.argv[1])
rs, queries = dense(ds, embedder=cfg.embedder, split=cfg.split)
emb = rs.embeddings / np.linalg.norm(rs.embeddings, axis=1, keepdims=True)
correct = np.nan_to_num(rs.labels) >= 0.5  # [N, M]
tasks = np.array(rs.tasks)
res: dict[tuple, list[float]] = {}
for seed in cfg.seeds:
    rs.split = make_split(queries, cfg.split.model_copy(update={"seed": seed}))
    tr = rs.rows("train")
    prior = correct[tr].mean(0)  # [M]
    names = sorted(set(tasks[tr]))
    table = np.stack([correct[tr][tasks[tr] == t].mean(0) for t in names])  # [tasks, M]
    clf = LogisticRegression(C=10, max_iter=2000).fit(emb[tr], tasks[tr])
    for part, rows in (("id", rs.rows("test")), ("ood", rs.rows("ood"))):
        order = np.argsort(-(emb[rows] @ emb[tr].T), axis=1)  # [n, train] nearest first
        soft = clf.predict_proba(emb[rows]) @ table  # [n, M]
        res.setdefault((part, "task classifier x per-task accuracy"), []).append(routed_accuracy(soft, rs.labels[rows]))
        for k in (20, 50, 100, 200, 400):
            hits = correct[tr][order[:, :k]].sum(1)  # [n, M]
            for alpha in (0, 5, 20, 50):
                res.setdefault((part, f"kNN k={k} + {alpha} prior pseudo-counts"), []).append(routed_accuracy((hits + alpha * prior) / (k + alpha), rs.labels[rows]))
                res.setdefault((part, f"kNN k={k} + {alpha} task-classifier pseudo-counts"), []).append(routed_accuracy((hits + alpha * soft) / (k + alpha), rs.labels[rows]))
for part in ("id", "ood"):
    best = sorted(((np.mean(v), name) for (p, name), v in res.items() if p == part), reverse=True)
    print(f"{part}: best of {len(best)}: " + "; ".join(f"{name} {acc:.1f}" for acc, name in best[:3]))
    print(f"{part}: task classifier x per-task accuracy {np.mean(res[(part, 'task classifier x per-task accuracy')]):.1f}")
