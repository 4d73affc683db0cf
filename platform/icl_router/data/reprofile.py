"""``icl-router reprofile``: production traffic feeds the profiles (issue 25; docs/jobs.md).

1. The decision log (+ feedback) becomes a routing dataset (``importers.decisions_tables``): the
   logged routed queries whose text was kept; a feedback ``reference`` is a query's gold, graded with
   its task's grader.
2. A seeded sample (``sample``, at most ``max_queries``) of the gradable queries not re-profiled yet is
   run on every pool model and graded with the project's graders: the models with a path through the
   profile job's Ray Data + vLLM pipeline (``profile.run_profile``), endpoint models through their
   endpoint; or (``via: service``) every pool model through the running service, by its own name.
   Queries with neither a reference nor a gold are not graded: a judge model is not implemented.
3. Each graded query is embedded with the router's embedder and its outcomes join the router
   directory's evidence store (``routing/evidence_store.py``), with the feedback outcomes of the
   answering model (``feedback``). The store's new generation moves the registry's pool version: every
   router replica reloads it on its next sync. Nothing is retrained; the decision layer's parameters
   stay as fitted, the store joins the router's p through its kernel.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from icl_router import schemas
from icl_router.config import (
    CandidateModelConfig,
    ConfigError,
    ProfileConfig,
    ReprofileConfig,
    ServeConfig,
    load_config,
)
from icl_router.data.dataset import Dataset
from icl_router.graders import GRADERS


def _log(msg: str) -> None:
    print(f"reprofile: {msg}", file=sys.stderr, flush=True)


def resolve_config(cfg: ReprofileConfig) -> tuple[ReprofileConfig, ServeConfig | None]:
    """``cfg`` with the router, decision log, models and endpoints filled in from its serve config."""
    serve = load_config(ServeConfig, cfg.serve, []) if cfg.serve else None
    upd: dict[str, Any] = {}
    if cfg.router is None:
        upd["router"] = serve.router.path if serve else None
    if cfg.decision_log is None:
        upd["decision_log"] = serve.decision_log.dir if serve else None
    if serve is not None and not cfg.models and not cfg.endpoints:
        upd["models"] = [CandidateModelConfig(name=m.name, path=m.path, engine_kwargs=m.engine_kwargs, accelerator=m.accelerator,
                                              accelerator_type=m.accelerator_type, env_vars=m.env_vars, sampling=cfg.sampling)
                         for m in serve.pool if m.path is not None]
        upd["endpoints"] = {m.name: m.endpoint for m in serve.pool if m.endpoint is not None}
    cfg = cfg.model_copy(update=upd)
    missing = [k for k in ("router", "decision_log") if getattr(cfg, k) is None]
    if missing:
        raise ConfigError(f"reprofile: set {missing} (or serve: a serve config that names them)")
    if not cfg.models and not cfg.endpoints:
        raise ConfigError("reprofile: no pool model to run: set models / endpoints, or serve: a serve config with a pool")
    return cfg, serve


def _working_dataset(path: Path, queries: pa.Table) -> Dataset:
    """The working dataset with ``queries`` merged in (earlier runs' outcomes kept, so their pairs are skipped)."""
    ds = Dataset(path)
    if ds.queries_path.is_file():
        old = ds.read_queries()
        known = set(old.column(schemas.QUERY_ID).to_pylist())
        new = queries.filter(pc.invert(pc.is_in(queries.column(schemas.QUERY_ID), pa.array(list(known), pa.string()))))
        # a reference given since the last run: the later table wins for a query's gold
        ref = {q: (g, gr) for q, g, gr in zip(*(queries.column(c).to_pylist() for c in (schemas.QUERY_ID, schemas.GOLD, schemas.GRADER))) if g is not None}
        rows = old.to_pylist()
        for r in rows:
            if r[schemas.QUERY_ID] in ref and r[schemas.GOLD] is None:
                r[schemas.GOLD], r[schemas.GRADER] = ref[r[schemas.QUERY_ID]]
        queries = pa.concat_tables([pa.Table.from_pylist(rows, schema=schemas.QUERIES_SCHEMA), new.cast(schemas.QUERIES_SCHEMA)])
    path.mkdir(parents=True, exist_ok=True)
    ds.write_queries(queries)
    return ds


def _chat(url: str, key: str | None, model: str, prompt: str, *, max_tokens: int, temperature: float, timeout: float = 300.0) -> tuple[str, dict]:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
                       "temperature": temperature}).encode()
    req = urllib.request.Request(url.rstrip("/") + "/chat/completions", data=body, headers={"content-type": "application/json",
                                 **({"authorization": f"Bearer {key}"} if key else {})})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        out = json.loads(r.read())
    return out["choices"][0]["message"]["content"] or "", out.get("usage") or {}


def _ask_http(ds: Dataset, todo: pa.Table, *, model: str, url: str, key: str | None, remote_name: str, cfg: ReprofileConfig) -> int:
    """Ask ``model`` (at ``url`` as ``remote_name``) every query of ``todo``, grade, append; outcomes written."""
    from icl_router.data.profile import build_prompt, graded_outcome

    rows = todo.to_pylist()

    def one(row: dict) -> dict:
        t0 = time.perf_counter()
        text, usage = _chat(url, key, remote_name, build_prompt(row[schemas.GRADER], row[schemas.TEXT], style=cfg.prompt_style),
                            max_tokens=cfg.max_tokens.get(row[schemas.TASK], cfg.sampling.max_tokens), temperature=cfg.sampling.temperature)
        return graded_outcome(row, text, model_id=model, cost=None, latency_s=time.perf_counter() - t0,
                              prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"), style=cfg.prompt_style)

    with ThreadPoolExecutor(cfg.concurrency) as pool:
        out = list(pool.map(one, rows))
    if out:
        ds.append_outcomes(pa.Table.from_pylist(out))
    return len(out)


def _service(cfg: ReprofileConfig, serve: ServeConfig | None) -> tuple[str, str | None]:
    url = cfg.service_url or (f"http://{serve.host}:{serve.port}/v1" if serve else None)
    if url is None:
        raise ConfigError("reprofile via service: set service_url (or serve: the service's config)")
    entries = [e for e in os.environ.get(cfg.service_key_env, "").split(",") if e.strip()] or (list(serve.auth.api_keys) if serve else [])
    key = entries[0].split(":", 1)[-1].strip() if entries else None
    return url, key


def run_reprofile(cfg: ReprofileConfig) -> dict:
    from icl_router.data.importers import decisions_tables
    from icl_router.routing import evidence_store

    cfg, serve = resolve_config(cfg)
    router = Path(cfg.router)
    queries, feedback = decisions_tables([cfg.decision_log])
    work = Path(cfg.dataset or Path(cfg.decision_log) / "reprofile")
    gradable = np.array([g is not None and gr in GRADERS for g, gr in zip(queries.column(schemas.GOLD).to_pylist(), queries.column(schemas.GRADER).to_pylist())])
    in_store = set(evidence_store.read_table(router).filter(pc.equal(pc.field("source"), "reprofile")).column("query_id").to_pylist())
    fresh = np.array([q not in in_store for q in queries.column(schemas.QUERY_ID).to_pylist()])
    pick = np.flatnonzero(gradable & fresh)
    rng = np.random.default_rng(cfg.seed)
    n = min(len(pick), max(1 if len(pick) else 0, int(round(cfg.sample * len(pick)))), cfg.max_queries or len(pick))
    chosen = np.sort(rng.choice(pick, n, replace=False)) if n else pick[:0]
    summary: dict[str, Any] = {"logged_with_text": queries.num_rows, "gradable": int(gradable.sum()), "ungraded_no_reference": int((~gradable).sum()),
                               "judge": "not implemented: queries without a reference or gold are not graded",
                               "sampled": int(n), "models": {}, "feedback_outcomes": feedback.num_rows}
    _log(f"{queries.num_rows} logged queries with text, {int(gradable.sum())} gradable, {n} sampled ({cfg.sample:g}, at most {cfg.max_queries})")
    ds = _working_dataset(work, queries)
    ids = [queries.column(schemas.QUERY_ID)[int(i)].as_py() for i in chosen]
    todo_all = queries.take(pa.array(chosen, pa.int64())).select([schemas.QUERY_ID, schemas.TEXT, schemas.TASK, schemas.GRADER, schemas.GOLD])
    names = [m.name for m in cfg.models] + list(cfg.endpoints)
    if ids:
        if cfg.via == "service":
            url, key = _service(cfg, serve)
            for m in names:
                done = set(ds.read_outcomes([m]).column(schemas.QUERY_ID).to_pylist())
                todo = todo_all.filter(pc.invert(pc.is_in(todo_all.column(schemas.QUERY_ID), pa.array(list(done), pa.string()))))
                summary["models"][m] = {"ran": _ask_http(ds, todo, model=m, url=url, key=key, remote_name=m, cfg=cfg), "via": "service"}
        else:
            if cfg.models:
                from icl_router.data.profile import run_profile

                pcfg = ProfileConfig(dataset=str(work), models=cfg.models, queries="all", prompt_style=cfg.prompt_style, max_tokens=cfg.max_tokens,
                                     batch_size=cfg.batch_size, shard_size=cfg.shard_size, ray=cfg.ray)
                for m, info in run_profile(pcfg, query_ids=ids)["models"].items():
                    summary["models"][m] = {"ran": info["ran"], "via": "ray-data"}
            for m, ep in cfg.endpoints.items():
                done = set(ds.read_outcomes([m]).column(schemas.QUERY_ID).to_pylist())
                todo = todo_all.filter(pc.invert(pc.is_in(todo_all.column(schemas.QUERY_ID), pa.array(list(done), pa.string()))))
                key = os.environ.get(ep.api_key_env) if ep.api_key_env else None
                summary["models"][m] = {"ran": _ask_http(ds, todo, model=m, url=ep.base_url, key=key, remote_name=ep.model, cfg=cfg), "via": "endpoint"}
    rows = _store_rows(cfg, router, ds, ids, names, feedback, queries)
    summary["store_rows_added"] = rows.num_rows
    if rows.num_rows:
        manifest = evidence_store.append(router, rows, max_queries=cfg.max_store_queries)
        summary["store"] = {k: manifest[k] for k in ("generation", "rows", "queries")}
        _log(f"evidence store of {router}: {manifest['queries']} queries, {manifest['rows']} rows, generation {manifest['generation'][:8]}")
    return summary


def _store_rows(cfg: ReprofileConfig, router: Path, ds: Dataset, ids: list[str], models: list[str], feedback: pa.Table, queries: pa.Table) -> pa.Table:
    """The store rows of this run: every model's outcome on the re-profiled queries, and the feedback outcomes of
    the answering model on queries not re-profiled (``feedback``); each query embedded with the router's embedder."""
    from icl_router.routing.evidence_store import EVIDENCE_SCHEMA, read_table
    from icl_router.serving.decision_log import now

    out = ds.read_outcomes(models)
    out = out.filter(pc.is_in(out.column(schemas.QUERY_ID), pa.array(ids, pa.string()))) if ids else out.slice(0, 0)
    recs = [(r[schemas.QUERY_ID], r[schemas.MODEL_ID], float(r[schemas.SCORE]), "reprofile") for r in out.select([schemas.QUERY_ID, schemas.MODEL_ID, schemas.SCORE]).to_pylist()]
    if cfg.feedback:
        stored = {(r["query_id"], r["model_id"]) for r in read_table(router).select(["query_id", "model_id"]).to_pylist()}
        done = set(ids)
        recs += [(r[schemas.QUERY_ID], r[schemas.MODEL_ID], float(r[schemas.SCORE]), "feedback") for r in feedback.to_pylist()
                 if r[schemas.QUERY_ID] not in done and (r[schemas.QUERY_ID], r[schemas.MODEL_ID]) not in stored]
    if not recs:
        return EVIDENCE_SCHEMA.empty_table()
    text = dict(zip(queries.column(schemas.QUERY_ID).to_pylist(), queries.column(schemas.TEXT).to_pylist()))
    qids = list(dict.fromkeys(q for q, *_ in recs))
    emb = dict(zip(qids, embed_for_router(router, [text[q] for q in qids])))
    t = now()
    return pa.Table.from_pylist([{"query_id": q, "embedding": emb[q].tolist(), "model_id": m, "score": s, "source": src, "time": t}
                                 for q, m, s, src in recs], schema=EVIDENCE_SCHEMA)


def embed_for_router(router: Path, texts: list[str]) -> np.ndarray:
    """Unit vectors [N, E] of ``texts`` from the embedder the router's anchors were embedded with."""
    from icl_router.data.embedder import load_query_embedder
    from icl_router.model.router_dir import read_meta

    meta = read_meta(router)
    emb = load_query_embedder(meta.embedder_name, where=f"router {router}")
    return np.asarray(emb.encode(texts, normalize_embeddings=True, convert_to_numpy=True), dtype=np.float32)
