"""Does the query's text add what MiniLM misses? (README: evaluate)

kNN routing and a task classifier on MiniLM, on character n-gram TF-IDF (2-4, fitted on
each seed's train split, SVD to 128 dimensions) and on both concatenated, standard
protocol, 3 seeds. Run after `icl-router evaluate --config jobs/evaluate/standard.yaml`
has imported and embedded the data:

    .venv/bin/python docs/analysis/text_features.py runs/cache/evaluate/llmrouter-llmrouter-*/
"""

import sys

import numpy as np
from sklearn.decomposition import TruncatedSVD
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression

from icl_router.config import EvaluateConfig, load_config
from icl_router.data.dataset import Dataset
from icl_router.data.splits import make_split
from icl_router.evaluation.baselines import knn, routed_accuracy
from icl_router.evaluation.run import dense

cfg = load_config(EvaluateConfig, "jobs/evaluate/standard.yaml", [])
rs, queries = dense(Dataset(sys.argv[1]), embedder=cfg.embedder, split=cfg.split)
e = rs.embeddings / np.linalg.norm(rs.embeddings, axis=1, keepdims=True)
tasks = np.array(rs.tasks)
res: dict[tuple, list[float]] = {}
for seed in cfg.seeds:
    rs.split = make_split(queries, cfg.split.model_copy(update={"seed": seed}))
    tr, te, ood = rs.rows("train"), rs.rows("test"), rs.rows("ood")
    tfidf = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=3, sublinear_tf=True, max_features=50_000).fit([rs.texts[i] for i in tr])
    x = tfidf.transform(rs.texts)
    z = TruncatedSVD(128, random_state=0).fit(x[tr]).transform(x)
    z /= np.linalg.norm(z, axis=1, keepdims=True) + 1e-9
    for name, f in (("MiniLM", e), ("TF-IDF", z), ("MiniLM + TF-IDF", np.concatenate([e, z], 1) / np.sqrt(2))):
        for part, rows in (("id", te), ("ood", ood)):
            for k in (20, 50):
                res.setdefault((part, name, f"kNN k={k}"), []).append(routed_accuracy(knn(f[tr], rs.labels[tr], f[rows], k=k), rs.labels[rows]))
        clf = LogisticRegression(C=10, max_iter=2000).fit(f[tr], tasks[tr])
        res.setdefault(("id", name, "task classifier accuracy"), []).append(100 * float((clf.predict(f[te]) == tasks[te]).mean()))
for (part, name, what), v in sorted(res.items()):
    print(f"{part:4s} {name:16s} {what:25s} {np.mean(v):.1f} ± {np.std(v):.1f}")
