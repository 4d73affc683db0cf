"""The judge's pure parts (data/judge.py): the verdict parser, the agreement with the graders, the gate, the
rubric, and the config's checks (config.JudgeConfig)."""

import pytest

from icl_router.config import ConfigError, JudgeConfig, ReprofileConfig, build_config
from icl_router.data.judge import DEFAULT_RUBRIC, MAX_ANSWER_CHARS, agreement, gate, parse_verdict, render

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("reply, score", [
    ("Yes", 1.0), ("yes.", 1.0), ("**Yes**", 1.0), ("No", 0.0), ("No, the capital is Rome.", 0.0),
    ("The answer is correct.", 1.0), ("The answer is incorrect.", 0.0), ("The answer is not correct.", 0.0),
    ("Correct", 1.0), ("Wrong", 0.0), ("True", 1.0), ("false", 0.0), ("Yes, it is right.", 1.0),
    ("1", 1.0), ("0", 0.0), ("0.75", 0.75), ("Score: 0.5", 0.5), ("1.0", 1.0),
    ("", None), (None, None), ("Hmm, hard to say.", None), ("Paris", None), ("42", None),
])
def test_verdicts_parse_to_a_score_or_to_none(reply, score):
    assert parse_verdict(reply) == score


def test_agreement_counts_and_kappa():
    judge = [True, True, False, False, True, False, False, False]
    graders = [True, False, False, False, True, True, False, False]
    a = agreement(judge, graders)
    assert a["confusion"] == {"tp": 2, "fp": 1, "fn": 1, "tn": 4} and a["n"] == 8 and a["accuracy"] == 0.75
    # po = 6/8; pe = (3/8)(3/8) + (5/8)(5/8) = 34/64; kappa = (0.75 - 34/64) / (1 - 34/64) = 14/30
    assert a["kappa"] == round(14 / 30, 4)
    assert agreement([True, False], [True, False])["kappa"] == 1.0
    assert agreement([False, True], [True, False])["kappa"] == -1.0


def test_agreement_of_a_constant_judge_is_chance():
    graders = [False] * 9 + [True]
    a = agreement([False] * 10, graders)  # "always wrong": 90% accurate, no information
    assert a["accuracy"] == 0.9 and a["kappa"] == 0.0
    assert agreement([True] * 4, [True] * 4)["kappa"] is None  # both constant and alike: undefined
    assert agreement([], [])["n"] == 0 and agreement([], [])["kappa"] is None
    with pytest.raises(ValueError):
        agreement([True], [])


def test_the_gate_opens_only_on_enough_agreement():
    good = agreement([True, False] * 20, [True, False] * 20)
    assert gate(good, metric="kappa", min_agreement=0.6, min_calibration=30) == (True, "kappa 1.0 >= judge.min_agreement 0.6 on 40 calibration answers")
    shut, why = gate(good, metric="kappa", min_agreement=0.6, min_calibration=50)
    assert not shut and "only 40 calibration answers" in why and "min_calibration 50" in why
    weak = agreement([False] * 40, [True] + [False] * 39)
    assert gate(weak, metric="accuracy", min_agreement=0.9, min_calibration=30)[0]  # accuracy is fooled by a constant judge...
    ok, why = gate(weak, metric="kappa", min_agreement=0.2, min_calibration=30)  # ...kappa is not
    assert not ok and "kappa 0.0 < judge.min_agreement 0.2" in why
    ok, why = gate(agreement([True] * 40, [True] * 40), metric="kappa", min_agreement=0.2, min_calibration=30)
    assert not ok and "undefined" in why


def test_the_rubric_shows_question_and_answer():
    p = render(DEFAULT_RUBRIC, "What is {x}?", "x" * (MAX_ANSWER_CHARS + 10))
    assert "Question: What is {x}?" in p and p.count("x") >= MAX_ANSWER_CHARS and "[... cut]" in p and "Yes or No" in p


@pytest.mark.parametrize("judge, where", [
    ({"enabled": True}, "exactly one of model"),
    ({"enabled": True, "model": "m", "endpoint": {"base_url": "http://x/v1", "model": "j"}}, "exactly one of model"),
    ({"enabled": True, "model": "m", "min_agreement": 1.5}, "judge.min_agreement: kappa lies in [-1, 1]"),
    ({"enabled": True, "model": "m", "metric": "accuracy", "min_agreement": -0.1}, "accuracy lies in [0, 1]"),
    ({"enabled": True, "model": "m", "calibration": 10, "min_calibration": 20}, "exceeds judge.calibration"),
    ({"enabled": True, "model": "m", "rubric": "Is {answer} right?"}, "judge.rubric: has no {question}"),
    ({"enabled": True, "model": "m", "metric": "f1"}, "judge.metric"),
    ({"enabled": True, "model": "m", "max_tokens": 0}, "judge.max_tokens"),
    ({"enabled": True, "endpoint": {"base_url": "x/v1", "model": "j"}}, "base_url must start with http"),
    ({"enabled": True, "model": "m", "rubrik": "x"}, "judge.rubrik: unknown key"),
])
def test_bad_judge_configs_name_the_field(judge, where):
    with pytest.raises(ConfigError, match="judge") as e:
        build_config(ReprofileConfig, {"router": "r", "decision_log": "d", "judge": judge})
    assert where in str(e.value)


def test_the_judge_is_off_by_default_and_a_disabled_one_needs_nothing():
    assert not ReprofileConfig().judge.enabled
    assert JudgeConfig(enabled=False).model is None
    cfg = build_config(ReprofileConfig, {"judge": {"enabled": True, "model": "gemma-3-270m", "min_agreement": 0.4}})
    assert cfg.judge.metric == "kappa" and cfg.judge.calibration == 200 and cfg.judge.rubric is None


def test_bench_judge_scores_a_judge_against_the_graders(tmp_path):
    """bench judge's arithmetic on a dataset's graded answers (its judges' vLLM runs are left to the bench itself)."""
    from argparse import Namespace

    import pyarrow as pa

    from icl_router.bench.judge import graded_answers, score_judge
    from icl_router.data.dataset import Dataset

    ds = Dataset(tmp_path / "ds")
    (tmp_path / "ds").mkdir()
    ds.write_queries(pa.Table.from_pylist([{"query_id": f"q{i}", "text": f"question {i}", "task": "qa" if i < 2 else "math", "split": "train",
                                            "gold": "x", "grader": "exact_match"} for i in range(4)]))
    ds.append_outcomes(pa.Table.from_pylist([{"query_id": f"q{i}", "model_id": m, "sample": 0, "score": float(i == 0), "correct": i == 0,
                                              "response": None if (i, m) == (3, "b") else f"answer {i}"} for i in range(4) for m in ("a", "b")]))
    rows = graded_answers(str(ds.root), models=None, limit=0, seed=0)
    assert len(rows) == 7 and sum(r["correct"] for r in rows) == 2  # the answer without a response is left out
    assert len(graded_answers(str(ds.root), models=["a"], limit=2, seed=0)) == 2
    args = Namespace(min_agreement=0.6, min_calibration=3)
    res = score_judge(rows, [1.0 if r["correct"] else (None if r["query_id"] == "q1" else 0.0) for r in rows], args)
    assert res["n"] == 5 and res["unparsed"] == 2 and res["kappa"] == 1.0 and res["gate"]["passed"]
    assert res["by_task"]["qa"] == {"n": 2, "accuracy": 1.0, "kappa": None, "unparsed": 2} and set(res["by_model"]) == {"a", "b"}
    constant = score_judge(rows, [0.0] * len(rows), args)
    assert constant["accuracy"] == round(5 / 7, 4) and constant["kappa"] == 0.0 and not constant["gate"]["passed"]
