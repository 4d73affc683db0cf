from pathlib import Path

import pytest

from icl_router.config import (
    AnchorsConfig,
    ConfigError,
    DemoConfig,
    EmbedConfig,
    EvalRouterConfig,
    EvaluateConfig,
    PhaseConfig,
    SplitConfig,
    TrainConfig,
    load_config,
)

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_yaml_roundtrip_and_overrides(tmp_path):
    p = write(tmp_path, "dataset: d\nk: 100\nsplit:\n  seed: 1\n")
    cfg = load_config(AnchorsConfig, p, ["split.seed=2", "k=50", "split.id_tasks=[a, b]"])
    assert (cfg.k, cfg.split.seed, cfg.split.id_tasks) == (50, 2, ["a", "b"])
    again = load_config(AnchorsConfig, write(tmp_path, cfg.to_yaml()))
    assert again == cfg


def test_unknown_key_names_dotted_path(tmp_path):
    p = write(tmp_path, "dataset: d\nsplit:\n  sed: 1\n")
    with pytest.raises(ConfigError, match=r"split\.sed: unknown key"):
        load_config(AnchorsConfig, p)


def test_wrong_type_names_dotted_path_and_value(tmp_path):
    p = write(tmp_path, "dataset: d\n")
    with pytest.raises(ConfigError, match=r"ray\.num_cpus: .*integer.*'many'"):
        load_config(EmbedConfig, p, ["ray.num_cpus=many"])


def test_missing_required_key(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset: required key is missing"):
        load_config(EmbedConfig, write(tmp_path, "batch_size: 8\n"))


def test_bad_override_syntax_and_section_clash(tmp_path):
    p = write(tmp_path, "dataset: d\n")
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(EmbedConfig, p, ["batch_size"])
    with pytest.raises(ConfigError, match="dataset is a value, not a section"):
        load_config(EmbedConfig, p, ["dataset.x=1"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(EmbedConfig, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(EmbedConfig, write(tmp_path, "- a\n- b\n"))


def test_validator_message():
    with pytest.raises(ValueError, match="train_fraction"):
        SplitConfig(train_fraction=1.5)


# ---- base: layering -----------------------------------------------------------


def test_base_is_merged_under_the_file_then_overrides_apply(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path, "dataset: d\nk: 100\nseed: 3\nsplit:\n  seed: 1\n  id_tasks: [a, b]\n")
    child = tmp_path / "sub" / "child.yaml"
    child.write_text("base: ../c.yaml\nk: 50\nsplit:\n  seed: 2\n")  # relative to the child's folder
    cfg = load_config(AnchorsConfig, child, ["seed=4"])
    assert (cfg.dataset, cfg.k, cfg.seed) == ("d", 50, 4)
    assert (cfg.split.seed, cfg.split.id_tasks) == (2, ["a", "b"])  # sections merge key by key


def test_base_chains_and_lists_or_nulls_replace(tmp_path):
    (tmp_path / "a.yaml").write_text("dataset: d\nsplit:\n  id_tasks: [a, b]\n  ood_tasks: [c]\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nsplit:\n  id_tasks: [x]\n")
    (tmp_path / "c.yaml").write_text("base: b.yaml\nsplit:\n  ood_tasks: null\n")
    cfg = load_config(AnchorsConfig, tmp_path / "c.yaml")
    assert (cfg.split.id_tasks, cfg.split.ood_tasks) == (["x"], None)


def test_base_cycle_is_an_error_naming_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\ndataset: d\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"cycle .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        load_config(AnchorsConfig, tmp_path / "a.yaml")
    (tmp_path / "self.yaml").write_text("base: self.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(AnchorsConfig, tmp_path / "self.yaml")


def test_missing_or_malformed_base_names_the_file(tmp_path):
    child = write(tmp_path, "base: nope.yaml\ndataset: d\n")
    with pytest.raises(ConfigError, match=rf"{child}: base file .*nope\.yaml does not exist"):
        load_config(AnchorsConfig, child)
    with pytest.raises(ConfigError, match=rf"{child}: base must be the path"):
        load_config(AnchorsConfig, write(tmp_path, "base: [a.yaml]\ndataset: d\n"))


def test_unknown_key_from_a_base_fails_after_the_merge(tmp_path):
    (tmp_path / "base.yaml").write_text("dataset: d\nsplit:\n  sed: 1\n")
    child = write(tmp_path, "base: base.yaml\nk: 3\n")
    with pytest.raises(ConfigError, match=r"split\.sed: unknown key"):
        load_config(AnchorsConfig, child)


# ---- defaults and the job files -----------------------------------------------


def test_a_section_given_in_part_keeps_its_default_values():
    cfg = EvaluateConfig.model_validate({"icl_router": {"router": {"tiny": {"hidden_size": 64}}}, "icl_router_text": {"k": 50}})
    assert cfg.icl_router.router.anchor_evidence and cfg.icl_router.router.tiny.hidden_size == 64  # not RouterConfig's defaults
    assert cfg.icl_router_text.k == 50 and cfg.icl_router_text.decision is not None
    assert EvaluateConfig.model_validate({"icl_router_text": None}).icl_router_text is None


def test_quick_is_standard_with_only_its_differences():
    quick = load_config(EvaluateConfig, JOBS / "evaluate" / "quick.yaml").model_dump()
    standard = load_config(EvaluateConfig, JOBS / "evaluate" / "standard.yaml").model_dump()
    differ = {k for k in standard if quick[k] != standard[k]}
    assert differ == {"seeds", "icl_router", "icl_router_text", "add_model", "k_sweep", "pool_sizes"}
    assert {k for k in standard["icl_router"] if quick["icl_router"][k] != standard["icl_router"][k]} == {"max_steps", "eval_every"}
    assert quick["icl_router_text"] is None


def test_the_suite_runs_every_dataset_and_its_quick_variant_one_seed():
    suite = load_config(EvaluateConfig, JOBS / "evaluate" / "suite.yaml")
    assert [d.name for d in suite.datasets] == ["llmrouter", "zeroeval", "routerbench", "local", "synthetic"] and suite.seeds == [0, 1, 2]
    assert all(d.split.ood_tasks for d in suite.datasets) and suite.routerbench is not None
    quick = load_config(EvaluateConfig, JOBS / "evaluate" / "suite-quick.yaml")
    assert quick.datasets == suite.datasets and quick.seeds == [0]
    with pytest.raises(ValueError, match="names \\['a'\\] appear more than once"):
        EvaluateConfig.model_validate({"datasets": [{"name": "a", "dataset": "x"}, {"name": "a", "dataset": "y"}]})
    with pytest.raises(ValueError, match="exactly one of dataset"):
        EvaluateConfig.model_validate({"datasets": [{"name": "a"}]})


def test_the_evaluated_routers_default_to_the_best_measured_configuration():
    rc = EvalRouterConfig()
    assert (rc.router.query_input, rc.router.profile_layout, rc.router.anchor_evidence) == ("vector", "pairs", True)
    assert (rc.k, rc.max_steps, rc.decision.clusters) == (500, 300, 8)
    assert [(p.epochs, p.lr_projector, p.lr_router) for p in rc.phases] == [(5, 3e-4, 3e-4)]
    assert load_config(EvaluateConfig, JOBS / "evaluate" / "standard.yaml").icl_router == rc


def test_a_phase_that_trains_nothing_is_refused():
    with pytest.raises(ValueError, match=r"phases\[1\] trains nothing"):
        TrainConfig(stage=2, dataset="d", output="o", phases=[PhaseConfig(), PhaseConfig(lr_projector=0, lr_router=0)])
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        PhaseConfig(lr_router=-1e-3)


def test_the_demo_trains_with_the_job_files_and_its_own_settings(tmp_path):
    from icl_router.demo import _train_config

    demo = DemoConfig(seed=3, stage1_epochs=3, stage2_epochs=2, stage1_lr=2e-3, stage2_lr=5e-4, num_workers=1)
    for stage in (1, 2):
        job = load_config(TrainConfig, JOBS / f"train-stage{stage}" / "config.yaml")
        cfg = _train_config(demo, tmp_path, stage=stage)
        assert (cfg.stage, cfg.models, cfg.seed, cfg.scaling.num_workers, cfg.ray) == (stage, None, 3, 1, demo.ray)
        assert cfg.dataset == str(tmp_path / "data") and cfg.output.startswith(str(tmp_path))
        # the demo's split: its in-distribution and out-of-distribution tasks, its seed
        assert (cfg.split.id_tasks, cfg.split.ood_tasks, cfg.split.seed) == (demo.id_tasks, demo.ood_tasks, 3)
        # everything else is the job file's
        same = {"batch_size", "max_text_tokens", "checkpoint_every", "deepspeed", "embedder", "max_steps"}
        assert {k: getattr(cfg, k) for k in same} == {k: getattr(job, k) for k in same}
        assert cfg.router.model_copy(update={"anchor_evidence": False}) == job.router.model_copy(update={"anchor_evidence": False})
    s1 = _train_config(demo, tmp_path, stage=1)
    assert [(p.epochs, p.lr_projector, p.lr_router) for p in s1.phases] == [(1, 2e-3, 0.0), (2, 2e-3, 2e-3)]  # epoch 1 projector alone
    s2 = _train_config(demo, tmp_path, stage=2)
    assert [(p.epochs, p.lr_projector, p.lr_router) for p in s2.phases] == [(2, 5e-4, 5e-4)]
    assert s2.init_from == str(tmp_path / "router-stage1") and s2.router.anchor_evidence == demo.anchor_evidence
    one = _train_config(demo.model_copy(update={"stage1_epochs": 1}), tmp_path, stage=1)
    assert [(p.epochs, p.lr_router) for p in one.phases] == [(1, 0.0)]


def test_every_policy_kind_can_be_configured_and_requested():
    from typing import get_args

    from icl_router.config import PolicyConfig
    from icl_router.kinds import PolicyKind
    from icl_router.routing.policy import Policy

    value = {"threshold": {"threshold": 0.5}, "margin": {"margin": 0.1}, "budget": {"budget": 1.0}, "cost": {"cost_weight": 2.0}}
    for kind in get_args(PolicyKind):
        cfg = PolicyConfig(kind=kind, **value.get(kind, {}))
        assert Policy(**cfg.model_dump()).kind == kind  # what the service builds from serve.yaml's policy
