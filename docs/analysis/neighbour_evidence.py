"""Neighbour evidence for the router: a lead measured outside the package (README: evaluate).

The query slot of a (query, model) pair takes [query embedding, evidence] where the
evidence is the model's mean correctness on the query's k nearest train queries
(k = 20, 100; leave-one-out for train queries) and its train accuracy. Anchor slots get
zeros there. Pairs are laid out as "virtual rows" row * M + model, so the router and the
training steps are unchanged. Serving it would need the train embeddings and labels in
the router directory, a contract change not made yet. Seed 0, standard protocol:

    .venv/bin/python docs/analysis/neighbour_evidence.py runs/cache/evaluate/llmrouter-llmrouter-*/ 0
"""

import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icl_router.config import EvaluateConfig, load_config
from icl_router.data.dataset import Dataset
from icl_router.data.routing_set import RoutingSet
from icl_router.evaluation import fit as F
from icl_router.evaluation.baselines import knn, routed_accuracy
from icl_router.evaluation.run import dense, train_config

SCALE = 0.25  # evidence in [-0.5, 0.5] * SCALE: comparable to a unit embedding's largest components


def evidence(rs: RoutingSet, *, pool: np.ndarray, ks: tuple[int, ...] = (20, 100)) -> np.ndarray:
    """float32 [N, M, len(ks) + 1] for every row: kNN means over ``pool`` rows (self excluded) and the prior."""
    e = rs.embeddings / np.linalg.norm(rs.embeddings, axis=1, keepdims=True)
    lab = np.nan_to_num(rs.labels[pool])  # [n, M]
    out = np.zeros((len(e), len(rs.models), len(ks) + 1), np.float32)
    out[:, :, -1] = lab.mean(0)
    for i in range(0, len(e), 512):
        sim = e[i : i + 512] @ e[pool].T  # [b, n]
        self_hit = pool[None, :] == np.arange(i, min(i + 512, len(e)))[:, None]
        sim[self_hit] = -np.inf  # leave-one-out: a train query never sees its own label
        order = np.argsort(-sim, axis=1)[:, : max(ks)]
        for j, k in enumerate(ks):
            out[i : i + 512, :, j] = lab[order[:, :k]].mean(1)
    return (out - 0.5) * SCALE


def with_evidence(data: dict[str, Any], rs: RoutingSet, ev: np.ndarray) -> dict[str, Any]:
    """``data`` of ``train.loop`` whose pairs use virtual rows and [embedding, evidence] vectors."""
    n, m, f = ev.shape
    items = data["items"].copy()
    items[:, 0] = items[:, 0] * m + items[:, 1]
    emb = np.concatenate([np.repeat(rs.embeddings, m, axis=0), ev.reshape(n * m, f)], axis=1)  # [N*M, E+F]
    anchors = np.concatenate([data["anchor_emb"], np.zeros((len(data["anchor_emb"]), f), np.float32)], axis=1)
    return {**data, "items": items, "embeddings": emb, "anchor_emb": anchors, "texts": [""] * (n * m)}


@torch.no_grad()
def score_evidence(router: Any, rs: RoutingSet, rows: np.ndarray, profiles: np.ndarray, ev: np.ndarray, *, models: list[int] | None = None, chunk: int = 64) -> np.ndarray:
    """p(correct) [len(rows), T] with per-(query, model) query vectors (vector mode)."""
    models = list(range(len(profiles))) if models is None else models
    router.eval()
    caches = [router.build_prefix_cache(torch.as_tensor(p)) for p in profiles]
    T = len(caches)
    out = []
    for i in range(0, len(rows), chunk):
        r = rows[i : i + chunk]
        Q = len(r)
        vec = np.concatenate([np.repeat(rs.embeddings[r][None], T, 0), ev[r][:, models].transpose(1, 0, 2)], axis=2)  # [T, Q, E+F]
        ids, lens = router.encode_queries([""] * Q)
        stacked = tuple(
            (torch.cat([c[li][0] for c in caches]).repeat_interleave(Q, 0), torch.cat([c[li][1] for c in caches]).repeat_interleave(Q, 0))
            for li in range(len(caches[0]))
        )  # per layer [T*Q, kv, P, d], row t*Q + q
        d = router._suffix_forward(stacked, ids.repeat(T, 1), lens.repeat(T), torch.as_tensor(vec.reshape(T * Q, -1)))
        out.append(torch.sigmoid(d.float()).view(T, Q).T.numpy())
    return np.concatenate(out)


if __name__ == "__main__":
    torch.set_num_threads(1)
    seed = int(sys.argv[2])
    cfg = load_config(EvaluateConfig, "jobs/evaluate/standard.yaml", ["icl_router.max_steps=null", "icl_router.phases=[{epochs: 3, lr_projector: 3.0e-4, lr_router: 3.0e-4}]"])
    rs0, queries = dense(Dataset(sys.argv[1]), embedder=cfg.embedder, split=cfg.split)
    rs = F.for_seed(rs0, queries, cfg.split, seed=seed, k=cfg.icl_router.k)
    tcfg = train_config(cfg.icl_router, seed=seed)
    data, val = F.train_data(rs, val_fraction=cfg.icl_router.val_fraction, seed=seed)
    ev = evidence(rs, pool=rs.rows("train"))
    data = with_evidence(data, rs, ev)
    scorer = lambda router, rows: score_evidence(router, rs, rows, data["profiles"], ev)  # noqa: E731
    init = F.tiny_init(tcfg, rs.texts, Path(cfg.cache_dir))
    router, info = F.fit(tcfg, data, init_dir=init, rs=rs, val=val, eval_every=cfg.icl_router.eval_every, scorer=scorer)
    tr = rs.rows("train")
    for part in ("test", "ood"):
        rows = rs.rows(part)
        ours = routed_accuracy(scorer(router, rows), rs.labels[rows])
        base = routed_accuracy(knn(rs.embeddings[tr], rs.labels[tr], rs.embeddings[rows], k=cfg.knn_k), rs.labels[rows])
        print(f"seed {seed} {part}: icl-router + evidence {ours:.1f}, knn {base:.1f} (best step {info['best_step']})")
