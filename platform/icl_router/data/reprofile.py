"""``icl-router reprofile``: production traffic feeds the profiles (issue 25; docs/jobs.md).

1. The decision log (+ feedback) becomes a routing dataset (``importers.decisions_tables``): the
   logged routed queries whose text was kept; a feedback ``reference`` is a query's gold, graded with
   its task's grader.
2. A seeded sample (``sample``, at most ``max_queries``) of the gradable queries not re-profiled yet
   (and, with ``judge.enabled``, of the others not judged yet) is run on every pool model: the models
   with a path through the profile job's Ray Data + vLLM pipeline (``profile.run_profile``), endpoint
   models through their endpoint; or (``via: service``) every pool model through the running service,
   by its own name. Answers to gradable queries are graded with the project's graders (``outcomes/``
   of the working dataset); the others are kept ungraded (``answers/``).
3. With a judge (``judge``, data/judge.py): the judge model (a pool model, by path on Ray Data, by its
   endpoint or through the service; or any endpoint) reads the rubric with the question and each
   model's answer and gives a verdict, parsed to a score in [0, 1] (unreadable: not graded, counted).
   In the same run it judges a calibration sample of graded answers without their reference; its
   agreement with the graders (accuracy, Cohen's kappa, confusion counts, n) is in the summary, and its
   outcomes join the store (source ``judge``) only when the gate opens (``judge.metric`` >=
   ``judge.min_agreement`` on >= ``judge.min_calibration`` answers); else they are dropped, and the
   summary and the log say why. Verdicts are kept per judge and rubric (``judgements/``).
4. Each graded or judged query is embedded with the router's embedder and its outcomes join the router
   directory's evidence store (``routing/evidence_store.py``), with the feedback outcomes of the
   answering model (``feedback``). The store's new generation moves the registry's pool version: every
   router replica reloads it on its next sync. Nothing is retrained; the decision layer's parameters
   stay as fitted, the store joins the router's p through its kernel.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from icl_router import schemas
from icl_router.config import (
    CandidateModelConfig,
    ConfigError,
    ProfileConfig,
    ReprofileConfig,
    ServeConfig,
    load_config,
)
from icl_router.data.dataset import Dataset, new_run_id
from icl_router.data.judge import (
    DEFAULT_RUBRIC,
    chat,
    gate,
    judge_http,
    judge_vllm,
    render,
    score_agreement,
    verdict_rows,
)
from icl_router.graders import GRADERS
from icl_router.raycluster import ensure_ray


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
    pool = [m.name for m in cfg.models] + list(cfg.endpoints)
    if cfg.judge.enabled and cfg.judge.model is not None and cfg.judge.model not in pool:
        raise ConfigError(f"reprofile: judge.model {cfg.judge.model!r} is not a pool model ({pool}); name one of them, "
                          "or give judge.endpoint {base_url, model, api_key_env} instead")
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


def read_parts(ds: Dataset, kind: str) -> list[dict]:
    """The rows of ``<work>/<kind>/`` (``answers``: ungraded answers; ``judgements``: a judge's verdicts), oldest first."""
    d = ds.root / kind
    return [r for f in sorted(d.glob("*.parquet")) for r in pq.read_table(f).to_pylist()] if d.is_dir() else []


def _append_part(ds: Dataset, kind: str, rows: list[dict]) -> None:
    if rows:
        d = ds.root / kind
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), d / f"{new_run_id()}.parquet")


def _ask_http(ds: Dataset, todo: pa.Table, *, model: str, url: str, key: str | None, remote_name: str, cfg: ReprofileConfig) -> int:
    """Ask ``model`` (at ``url`` as ``remote_name``) every query of ``todo``, grade the gradable ones, append;
    rows written (graded to outcomes/, the others to answers/ for the judge)."""
    from icl_router.data.profile import answer_row, build_prompt, graded_outcome

    rows = todo.to_pylist()

    def one(row: dict) -> dict:
        t0 = time.perf_counter()
        text, usage = chat(url, key, remote_name, build_prompt(row[schemas.GRADER], row[schemas.TEXT], style=cfg.prompt_style),
                           max_tokens=cfg.max_tokens.get(row[schemas.TASK], cfg.sampling.max_tokens), temperature=cfg.sampling.temperature)
        make = partial(graded_outcome, style=cfg.prompt_style) if row[schemas.GOLD] is not None else answer_row
        return make(row, text, model_id=model, cost=None, latency_s=time.perf_counter() - t0,
                    prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"))

    with ThreadPoolExecutor(cfg.concurrency) as pool:
        out = list(pool.map(one, rows))
    graded = [r for r in out if schemas.SCORE in r]
    if graded:
        ds.append_outcomes(pa.Table.from_pylist(graded))
    _append_part(ds, "answers", [r for r in out if schemas.SCORE not in r])
    return len(out)


def _service(cfg: ReprofileConfig, serve: ServeConfig | None) -> tuple[str, str | None]:
    url = cfg.service_url or (f"http://{serve.host}:{serve.port}/v1" if serve else None)
    if url is None:
        raise ConfigError("reprofile via service: set service_url (or serve: the service's config)")
    entries = [e for e in os.environ.get(cfg.service_key_env, "").split(",") if e.strip()] or (list(serve.auth.api_keys) if serve else [])
    key = entries[0].split(":", 1)[-1].strip() if entries else None
    return url, key


def _sample(cfg: ReprofileConfig, router: Path, queries: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(gradable [N] bool, the sampled row indices): the fresh gradable queries, and with a judge the fresh
    others, sampled at ``sample`` (at most ``max_queries``). Fresh: not re-profiled yet (nor judged, for
    the others: a judged query that gains a reference is re-profiled and graded)."""
    from icl_router.routing import evidence_store

    gradable = np.array([g is not None and gr in GRADERS for g, gr in zip(queries.column(schemas.GOLD).to_pylist(), queries.column(schemas.GRADER).to_pylist())])
    store = evidence_store.read_table(router).select(["query_id", "source"]).to_pylist()
    graded_q = {r["query_id"] for r in store if r["source"] == "reprofile"}
    judged_q = {r["query_id"] for r in store if r["source"] == "judge"}
    qids = queries.column(schemas.QUERY_ID).to_pylist()
    fresh = np.array([q not in graded_q and (g or q not in judged_q) for q, g in zip(qids, gradable)], dtype=bool)
    pick = np.flatnonzero(fresh & (gradable | cfg.judge.enabled))
    rng = np.random.default_rng(cfg.seed)
    n = min(len(pick), max(1 if len(pick) else 0, int(round(cfg.sample * len(pick)))), cfg.max_queries or len(pick))
    return gradable, (np.sort(rng.choice(pick, n, replace=False)) if n else pick[:0])


def _not_done(todo: pa.Table, done: set[str]) -> pa.Table:
    return todo.filter(pc.invert(pc.is_in(todo.column(schemas.QUERY_ID), pa.array(list(done), pa.string()))))


def _run_pool(cfg: ReprofileConfig, serve: ServeConfig | None, ds: Dataset, todo_all: pa.Table, names: list[str]) -> dict:
    """Every pool model on every query of ``todo_all`` not answered yet: {model: {ran, via}}."""
    gold = pc.is_valid(todo_all.column(schemas.GOLD))
    to_grade, to_judge = todo_all.filter(gold), todo_all.filter(pc.invert(gold))
    answered: dict[str, set[str]] = {m: set() for m in names}
    for r in read_parts(ds, "answers"):
        answered.setdefault(r[schemas.MODEL_ID], set()).add(r[schemas.QUERY_ID])
    out: dict[str, dict] = {}

    def todo(m: str) -> pa.Table:
        return pa.concat_tables([_not_done(to_grade, set(ds.read_outcomes([m]).column(schemas.QUERY_ID).to_pylist())),
                                 _not_done(to_judge, answered[m])])

    if cfg.via == "service":
        url, key = _service(cfg, serve)
        for m in names:
            out[m] = {"ran": _ask_http(ds, todo(m), model=m, url=url, key=key, remote_name=m, cfg=cfg), "via": "service"}
        return out
    if cfg.models:
        from icl_router.data.profile import generate_outcomes, run_profile
        from icl_router.pretrained import prepare_model_path

        if to_grade.num_rows:
            pcfg = ProfileConfig(dataset=str(ds.root), models=cfg.models, queries="all", prompt_style=cfg.prompt_style, max_tokens=cfg.max_tokens,
                                 batch_size=cfg.batch_size, shard_size=cfg.shard_size, ray=cfg.ray)
            for m, info in run_profile(pcfg, query_ids=to_grade.column(schemas.QUERY_ID).to_pylist())["models"].items():
                out[m] = {"ran": info["ran"], "via": "ray-data"}
        for m in cfg.models:
            left = _not_done(to_judge, answered[m.name])
            if left.num_rows:
                ensure_ray(cfg.ray)
                # no grader and no gold ride along as null columns: empty strings (the question is asked as it came)
                left = left.set_column(left.schema.get_field_index(schemas.GRADER), schemas.GRADER, pa.array([""] * left.num_rows))
                left = left.set_column(left.schema.get_field_index(schemas.GOLD), schemas.GOLD, pa.array([""] * left.num_rows))
                m = m.model_copy(update={"path": prepare_model_path(m.path, accelerator=m.accelerator, what=f"models[{m.name}].path")})
                for shard in generate_outcomes(left, m, batch_size=cfg.batch_size,
                                               shard_size=cfg.shard_size, style=cfg.prompt_style, max_tokens=cfg.max_tokens, graded=False):
                    _append_part(ds, "answers", shard.to_pylist())
            out.setdefault(m.name, {"ran": 0, "via": "ray-data"})["ran"] += left.num_rows
    for m, ep in cfg.endpoints.items():
        key = os.environ.get(ep.api_key_env) if ep.api_key_env else None
        out[m] = {"ran": _ask_http(ds, todo(m), model=m, url=ep.base_url, key=key, remote_name=ep.model, cfg=cfg), "via": "endpoint"}
    return out


def run_reprofile(cfg: ReprofileConfig) -> dict:
    from icl_router.data.importers import decisions_tables
    from icl_router.routing import evidence_store

    cfg, serve = resolve_config(cfg)
    router = Path(cfg.router)
    queries, feedback = decisions_tables([cfg.decision_log])
    work = Path(cfg.dataset or Path(cfg.decision_log) / "reprofile")
    gradable, chosen = _sample(cfg, router, queries)
    n = len(chosen)
    summary: dict[str, Any] = {"logged_with_text": queries.num_rows, "gradable": int(gradable.sum()), "ungraded_no_reference": int((~gradable).sum()),
                               "sampled": n, "sampled_for_judge": int((~gradable[chosen]).sum()), "models": {}, "feedback_outcomes": feedback.num_rows,
                               "judge": {"enabled": False}}
    _log(f"{queries.num_rows} logged queries with text, {int(gradable.sum())} gradable, {n} sampled ({cfg.sample:g}, at most {cfg.max_queries}"
         f"{', judge on' if cfg.judge.enabled else ''})")
    ds = _working_dataset(work, queries)
    picked = queries.take(pa.array(chosen, pa.int64()))
    ids = [q for q, g in zip(picked.column(schemas.QUERY_ID).to_pylist(), gradable[chosen]) if g]
    judge_ids = [q for q, g in zip(picked.column(schemas.QUERY_ID).to_pylist(), gradable[chosen]) if not g]
    todo_all = picked.select([schemas.QUERY_ID, schemas.TEXT, schemas.TASK, schemas.GRADER])
    # a gold no grader reads is no gold: that query is judged (a null gold is what marks it for the judge below)
    todo_all = todo_all.append_column(schemas.GOLD, pa.array([g if ok else None for g, ok in zip(picked.column(schemas.GOLD).to_pylist(), gradable[chosen])],
                                                             pa.string()))
    names = [m.name for m in cfg.models] + list(cfg.endpoints)
    if n:
        summary["models"] = _run_pool(cfg, serve, ds, todo_all, names)
    judged: list[tuple[str, str, float]] = []
    if cfg.judge.enabled:
        summary["judge"], judged = run_judge(cfg, serve, ds, judge_ids=judge_ids, models=names)
    rows = _store_rows(cfg, router, ds, ids, names, feedback, queries, judged=judged)
    summary["store_rows_added"] = rows.num_rows
    if rows.num_rows:
        manifest = evidence_store.append(router, rows, max_queries=cfg.max_store_queries)
        summary["store"] = {k: manifest[k] for k in ("generation", "rows", "queries")}
        _log(f"evidence store of {router}: {manifest['queries']} queries, {manifest['rows']} rows, generation {manifest['generation'][:8]}")
    return summary


JudgeFn = Callable[[list[str]], list[str | None]]


def _judge_runner(cfg: ReprofileConfig, serve: ServeConfig | None) -> tuple[str, str, JudgeFn]:
    """(the judge's name, how it is reached, prompts -> replies) of ``cfg.judge``."""
    j = cfg.judge
    common = {"max_tokens": j.max_tokens}
    if j.endpoint is not None or j.model in cfg.endpoints:
        ep = j.endpoint or cfg.endpoints[j.model]
        key = os.environ.get(ep.api_key_env) if ep.api_key_env else None
        return j.model or f"endpoint:{ep.model}", "endpoint", partial(judge_http, url=ep.base_url, key=key, model=ep.model,
                                                                     concurrency=cfg.concurrency, timeout=ep.timeout_s, **common)
    if cfg.via == "service":
        url, key = _service(cfg, serve)
        return j.model, "service", partial(judge_http, url=url, key=key, model=j.model, concurrency=cfg.concurrency, **common)
    model = next(m for m in cfg.models if m.name == j.model)
    return j.model, "ray-data", partial(judge_vllm, model=model, batch_size=cfg.batch_size, ray_cfg=cfg.ray, **common)


def _calibration(cfg: ReprofileConfig, ds: Dataset, models: list[str]) -> list[tuple[str, str, str, bool]]:
    """A seeded sample of at most ``judge.calibration`` graded answers of the pool: (query, model, response, correct)."""
    out = ds.read_outcomes(models).select([schemas.QUERY_ID, schemas.MODEL_ID, schemas.RESPONSE, schemas.CORRECT]).to_pylist()
    rows = sorted((r[schemas.QUERY_ID], r[schemas.MODEL_ID], r[schemas.RESPONSE], bool(r[schemas.CORRECT])) for r in out
                  if r[schemas.RESPONSE] is not None)
    if len(rows) <= cfg.judge.calibration:
        return rows
    pick = np.random.default_rng(cfg.seed).choice(len(rows), cfg.judge.calibration, replace=False)
    return [rows[i] for i in sorted(pick)]


def run_judge(cfg: ReprofileConfig, serve: ServeConfig | None, ds: Dataset, *, judge_ids: list[str], models: list[str]
              ) -> tuple[dict, list[tuple[str, str, float]]]:
    """Judge every pool model's answer to ``judge_ids`` and a calibration sample of graded answers (reference unseen);
    (the summary, the (query, model, score) that join the store: all readable verdicts if the gate opens, else none).
    Verdicts are kept in ``<work>/judgements/`` per judge and rubric: a re-run asks only for the missing ones."""
    j = cfg.judge
    rubric = j.rubric or DEFAULT_RUBRIC
    name, via, ask = _judge_runner(cfg, serve)
    key = f"{name}#{hashlib.sha256(f'{rubric}|{j.max_tokens}'.encode()).hexdigest()[:8]}"
    text = dict(zip(*(ds.read_queries().column(c).to_pylist() for c in (schemas.QUERY_ID, schemas.TEXT))))
    answers = {(r[schemas.QUERY_ID], r[schemas.MODEL_ID]): r[schemas.RESPONSE] for r in read_parts(ds, "answers")}
    targets = [(q, m) for q in judge_ids for m in models if (q, m) in answers]
    calib = _calibration(cfg, ds, models)
    known = {(r[schemas.QUERY_ID], r[schemas.MODEL_ID]): r for r in read_parts(ds, "judgements") if r["judge"] == key}
    items = [{schemas.QUERY_ID: q, schemas.MODEL_ID: m, "kind": "judged", "answer": answers[(q, m)]} for q, m in targets if (q, m) not in known]
    items += [{schemas.QUERY_ID: q, schemas.MODEL_ID: m, "kind": "calibration", "answer": a} for q, m, a, _ in calib if (q, m) not in known]
    t0 = time.perf_counter()
    replies = ask([render(rubric, text[it[schemas.QUERY_ID]], it["answer"] or "") for it in items]) if items else []
    new = verdict_rows(items, replies, judge=key)
    _append_part(ds, "judgements", [r for r in new if r["reply"] is not None])  # a failed request is asked again next run
    known.update({(r[schemas.QUERY_ID], r[schemas.MODEL_ID]): r for r in new})
    scores = {qm: known[qm][schemas.SCORE] for qm in known}
    agree = score_agreement([scores.get((q, m)) for q, m, _, _ in calib], [c for *_, c in calib])
    passed, why = gate(agree, metric=j.metric, min_agreement=j.min_agreement, min_calibration=j.min_calibration)
    verdicts = [(q, m, scores.get((q, m))) for q, m in targets]
    readable = [(q, m, s) for q, m, s in verdicts if s is not None]
    summary = {"judge": name, "via": via, "asked": len(items), "failed_requests": sum(r is None for r in replies),
               "seconds": round(time.perf_counter() - t0, 2), "answers": len(targets), "unparsed": len(targets) - len(readable),
               "calibration": agree, "gate": {"metric": j.metric, "min_agreement": j.min_agreement, "passed": passed, "why": why},
               "outcomes_added": len(readable) if passed else 0}
    if readable and not passed:
        _log(f"judge {name}: {len(readable)} judged outcomes dropped, not added to the evidence: {why}")
    else:
        _log(f"judge {name}: {len(readable)} judged outcomes of {len(targets)} answers ({why})")
    return summary, readable if passed else []


def _store_rows(cfg: ReprofileConfig, router: Path, ds: Dataset, ids: list[str], models: list[str], feedback: pa.Table, queries: pa.Table, *,
                judged: list[tuple[str, str, float]] = ()) -> pa.Table:
    """The store rows of this run: every model's outcome on the re-profiled queries, the judge's admitted scores
    (source ``judge``), and the feedback outcomes of the answering model on queries not re-profiled (``feedback``;
    after the judge's, so a user's word on a judged answer wins); each query embedded with the router's embedder."""
    from icl_router.routing.evidence_store import EVIDENCE_SCHEMA, read_table
    from icl_router.serving.decision_log import now

    out = ds.read_outcomes(models)
    out = out.filter(pc.is_in(out.column(schemas.QUERY_ID), pa.array(ids, pa.string()))) if ids else out.slice(0, 0)
    recs = [(r[schemas.QUERY_ID], r[schemas.MODEL_ID], float(r[schemas.SCORE]), "reprofile") for r in out.select([schemas.QUERY_ID, schemas.MODEL_ID, schemas.SCORE]).to_pylist()]
    recs += [(q, m, float(sc), "judge") for q, m, sc in judged]
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
