"""The one decision fit (train/held_out.py): every held-out query whichever step is kept, and a
guard margin that stays cautious when the evidence for leaving the default is thin."""

from __future__ import annotations

import dataclasses

import numpy as np

from icl_router.config import (
    DecisionFitConfig,
    PhaseConfig,
    RouterConfig,
    SplitConfig,
    TinyRouterConfig,
    TrainStepsConfig,
)
from icl_router.data.routing_set import load_routing_set
from icl_router.routing.decision import pick_min_gain
from icl_router.train.data import build_train_data
from icl_router.train.driver import build_tiny_init
from icl_router.train.held_out import fit_decision_on_held_out, fold_trainer, held_out_rows, rows_trained
from icl_router.train.loop import PlainEngine, build_router, make_optimizer, train_steps


def test_a_bold_margin_that_wins_on_a_handful_of_queries_is_not_picked():
    rng = np.random.default_rng(0)
    cautious = (rng.random(600) < 0.6).astype(float)  # [600] routing with min_gain 0.2: mostly the default
    bold = cautious.copy()
    bold[np.flatnonzero(cautious == 0)[:12]] = 1.0  # 12 won and 9 lost of 600: inside the noise
    bold[np.flatnonzero(cautious == 1)[:9]] = 0.0
    assert np.mean(bold) > np.mean(cautious)  # the plain argmax would take the bold margin
    assert pick_min_gain({0.2: cautious, 0.0: bold}) == 0.2
    clearly = cautious.copy()
    clearly[np.flatnonzero(cautious == 0)[:90]] = 1.0  # 90 more right: far outside it
    assert pick_min_gain({0.2: cautious, 0.05: bold, 0.0: clearly}) == 0.0
    # between the best and the most cautious, the most cautious margin within reach of the best wins
    assert pick_min_gain({0.2: cautious, 0.1: clearly, 0.0: clearly}) == 0.1
    with_nan = cautious.copy()
    with_nan[:5] = np.nan  # unlabelled queries drop out instead of making the comparison NaN
    assert pick_min_gain({0.2: with_nan, 0.0: bold}) == 0.2


def _routing_set(value_setup):
    ds, _, _ = value_setup
    rs = load_routing_set(ds, split=SplitConfig(name="given"), embedder="test-embedder")
    return dataclasses.replace(rs, anchor_ids=rs.query_ids[:12])  # K=12; 48 held-out train queries


def test_a_kept_trained_step_fits_the_layer_on_as_many_queries_as_step_0(value_setup, tmp_path):
    rs = _routing_set(value_setup)
    tiny = TinyRouterConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, vocab_size=600)
    cfg = TrainStepsConfig(
        stage=2, router=RouterConfig(tiny=tiny, anchor_evidence=True), phases=[PhaseConfig(lr_projector=1e-3, lr_router=1e-3)],
        batch_size=8, max_steps=6, seed=0,
    )
    data, val = build_train_data(rs, stage=2, val_fraction=0.2, seed=cfg.seed)
    init = str(build_tiny_init(cfg, rs.texts, tmp_path / "init"))
    decision = DecisionFitConfig(clusters=3, tasks=False, folds=2)
    cols = list(range(len(rs.models)))
    held = held_out_rows(rs)

    untrained = build_router(cfg, anchor_emb=data.anchor_emb, init_dir=init).eval()
    at_0 = fit_decision_on_held_out(untrained, rs, cols=cols, decision=decision, max_text_tokens=32)

    trained = build_router(cfg, anchor_emb=data.anchor_emb, init_dir=init)
    engine = PlainEngine(trained, make_optimizer(trained, cfg), clip=1.0)
    steps = sum(1 for _ in train_steps(cfg, engine, data))
    seen = rows_trained(cfg, data, steps=steps)
    assert len(seen) and not np.isin(seen, val).any() and np.isin(seen, held).all()
    left_out = []
    folds = fold_trainer(cfg, data, steps=steps, init_dir=init)

    def fold_router(leave_out):
        left_out.append(leave_out)
        return folds(leave_out)

    kept = fit_decision_on_held_out(trained.eval(), rs, cols=cols, decision=decision, max_text_tokens=32, trained_on=seen, fold_router=fold_router)
    assert at_0.rows == len(held) == 48 and at_0.by_folds == 0
    assert kept.rows == at_0.rows  # the same queries, whichever step was kept
    assert kept.params.fitted["rows"] == at_0.params.fitted["rows"] == len(held)
    assert kept.folds == 2 and kept.by_folds == len(seen) and kept.by_kept == len(held) - len(seen)
    # each fold router left out exactly the queries it scored, and together they cover what the kept router trained on
    assert sorted(np.concatenate(left_out).tolist()) == sorted(seen.tolist())
    # without fold routers the queries the kept router trained on are left out: fewer rows
    thin = fit_decision_on_held_out(trained, rs, cols=cols, decision=decision.model_copy(update={"folds": 0}), max_text_tokens=32, trained_on=seen,
                                    fold_router=fold_router)
    assert thin.rows == len(held) - len(seen) < at_0.rows


def test_the_train_job_fits_the_kept_router_on_every_held_out_query_either_way(value_setup, tmp_path, monkeypatch):
    """driver.keep_and_fit_decision, as the rank-0 worker runs it: whichever router validation keeps,
    the decision layer written into its directory was fitted on every held-out train query."""
    from icl_router.config import TrainConfig
    from icl_router.evaluation import baselines
    from icl_router.model.router_dir import RouterMeta, read_meta, save_router_dir
    from icl_router.train.driver import keep_and_fit_decision

    rs = _routing_set(value_setup)
    tiny = TinyRouterConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, vocab_size=600)
    cfg = TrainConfig(
        stage=2, dataset="unused", output=str(tmp_path / "out"), router=RouterConfig(tiny=tiny, anchor_evidence=True),
        phases=[PhaseConfig(lr_projector=1e-3, lr_router=1e-3)], batch_size=8, max_steps=6, val_fraction=0.2,
        decision=DecisionFitConfig(clusters=3, tasks=False, folds=2),
    )
    data, val = build_train_data(rs, stage=2, val_fraction=cfg.val_fraction, seed=cfg.seed)
    init = str(build_tiny_init(cfg, rs.texts, tmp_path / "init"))
    trained = build_router(cfg, anchor_emb=data.anchor_emb, init_dir=init)
    steps = sum(1 for _ in train_steps(cfg, PlainEngine(trained, make_optimizer(trained, cfg), clip=1.0), data))
    layout = trained.layout
    meta = RouterMeta("test-embedder", 16, "vector", "pairs", layout.placeholder_id, layout.yes_id, layout.no_id, rs.anchor_ids, anchor_evidence=True)
    held = len(held_out_rows(rs))
    out = {}
    for keep in ("trained", "untrained"):
        path = save_router_dir(trained.eval(), tmp_path / keep, meta=meta, pool=dict(zip(data.models, data.profiles)))
        monkeypatch.setattr(baselines, "earliest_within_se", lambda hits, keep=keep: 1 if keep == "trained" else 0)
        out[keep] = keep_and_fit_decision(cfg, path, rs=rs, val=val, data=data, init_dir=init, untrained_to=tmp_path / f"{keep}-kept", steps=steps)
        assert out[keep]["kept"] == keep
        assert read_meta(out[keep]["dir"]).decision["fitted"]["rows"] == held
    assert out["trained"]["decision_rows"] == out["untrained"]["decision_rows"] == held
    assert out["trained"]["decision_folds"] == 2 and 0 < out["trained"]["decision_rows_folds"] < held
    assert out["untrained"]["decision_folds"] == 0 and out["untrained"]["decision_rows_kept"] == held


def _set_checkpoint(path, *, decision, extra) -> None:
    """Give a router directory a stored decision layer and the train job's provenance."""
    import json

    from icl_router.model.router_dir import META_FILE

    meta = json.loads((path / META_FILE).read_text())
    meta.update(decision=decision, extra=extra)
    (path / META_FILE).write_text(json.dumps(meta))


def test_evaluate_refits_a_checkpoints_layer_only_when_asked_and_only_where_it_can(value_setup, tmp_path):
    import pytest

    from icl_router.config import ConfigError, EvalRouterConfig
    from icl_router.evaluation.run import get_router
    from icl_router.routing.decision import DecisionParams

    rs = _routing_set(value_setup)
    _, path, _ = value_setup
    stored = DecisionParams(min_gain=1.0, fitted={"rows": 3}).to_json()  # a layer this code would never fit
    _set_checkpoint(path, decision=stored, extra={"steps": 24, "kept": "untrained"})  # the keep-check kept step 0
    rc = EvalRouterConfig(k=12, checkpoints=[str(path)], decision=DecisionFitConfig(clusters=3, tasks=False))

    def routed(**update):
        return get_router(rc.model_copy(update=update), rs, seed=0, seed_i=0, cache=tmp_path, label="test")

    assert routed().decision.min_gain == 1.0  # the stored layer, as the train job fitted it
    refit = routed(refit_decision=True)
    assert refit.info["kept_step"] == 0
    assert refit.decision.fitted["rows"] == len(held_out_rows(rs)) == 48  # fitted here, on every held-out query
    # a checkpoint kept at a trained step: the queries it trained on are unknown here, so no fit on them
    _set_checkpoint(path, decision=stored, extra={"steps": 24})
    with pytest.raises(ConfigError, match="kept trained step 24"):
        routed(refit_decision=True)
    _set_checkpoint(path, decision=None, extra={"steps": 24})
    with pytest.raises(ConfigError, match="kept trained step 24"):
        routed()
    assert routed(decision=None).decision is None  # no layer asked for: the raw argmax, nothing to fit
