import pytest

from icl_router.config import AnchorsConfig, ConfigError, EmbedConfig, SplitConfig, load_config


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
