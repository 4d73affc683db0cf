"""Real pretrained LMs as model directories (icl_router/pretrained.py): the checks every ``path:`` goes
through, and the packaged models as `make models` converts them (runs/models, before the tests run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from icl_router.pretrained import (
    COMPLETION_TEMPLATE,
    PACKAGED,
    RECORD_FILE,
    ModelPathError,
    ModelRecord,
    check_model_path,
    sha256_of,
)

MODELS = Path(__file__).resolve().parents[2] / "runs" / "models"


def _config_dir(tmp_path: Path, name: str = "m", **config) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(config))
    return d


def test_a_path_that_is_not_a_usable_model_gets_one_line_naming_it(tmp_path):
    cases = {
        str(tmp_path / "nope"): "no such file or directory",
        str(tmp_path / "nope.gguf"): "no such .gguf file",
        str(tmp_path): "not a model directory (no config.json)",
    }
    for path, why in cases.items():
        with pytest.raises(ModelPathError, match="pool\\[0\\].path") as e:
            check_model_path(path, what="pool[0].path")
        assert why in str(e.value) and path in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ModelPathError, match="make models"):
        check_model_path("runs/models/not-converted")


def test_head_sizes_vllm_cannot_serve_on_cpu_are_refused_before_deploying(tmp_path):
    d = _config_dir(tmp_path, model_type="qwen2", hidden_size=64, num_attention_heads=4)
    with pytest.raises(ModelPathError, match="head size 16"):
        check_model_path(str(d), accelerator="cpu")
    check_model_path(str(d), accelerator="gpu")  # the GPU kernels take it: not this check's business
    check_model_path(str(_config_dir(tmp_path, "ok", model_type="qwen2", hidden_size=128, num_attention_heads=4)), accelerator="cpu")


def test_an_unknown_architecture_is_refused(tmp_path):
    d = _config_dir(tmp_path, model_type="not-a-model", hidden_size=128, num_attention_heads=4)
    with pytest.raises(ModelPathError, match="model_type 'not-a-model'"):
        check_model_path(str(d))


def test_a_hub_id_is_left_to_the_cluster_that_has_it():
    check_model_path("Qwen/Qwen2.5-7B-Instruct", accelerator="gpu")


def test_the_completion_template_asks_a_question_and_leaves_the_answer_open():
    from jinja2 import Template

    text = Template(COMPLETION_TEMPLATE).render(bos_token="<bos>", messages=[{"role": "user", "content": "2+2?"}], add_generation_prompt=True)
    assert text.startswith("<bos>Question: ") and text.endswith("Question: 2+2?\nAnswer:\n")


@pytest.mark.parametrize("name", sorted(PACKAGED))
def test_packaged_models_are_converted_with_their_record(name):
    d = MODELS / name
    assert (d / RECORD_FILE).is_file(), f"{d} is missing: run `make models` (icl-router models)"
    record = ModelRecord.read(d)
    assert record is not None and record.sha256 == PACKAGED[name].sha256 and record.license == PACKAGED[name].license
    assert sha256_of(Path(record.source)) == record.sha256  # the file it came from, checksummed
    assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()


def test_gemma_adds_bos_and_is_prompted_as_a_base_model():
    from transformers import AutoTokenizer, GenerationConfig

    d = MODELS / "gemma-3-270m"
    tok = AutoTokenizer.from_pretrained(d)
    assert tok("Paris")["input_ids"][0] == tok.bos_token_id  # without it Gemma is a different model
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("Question: What is the capital of France?\nAnswer:\n")
    eos = GenerationConfig.from_pretrained(d).eos_token_id
    blank = tok("\n\n", add_special_tokens=False)["input_ids"]
    assert len(blank) == 1 and blank[0] in eos and tok.eos_token_id in eos  # an answer ends at a blank line
    assert ModelRecord.read(d).prompting.startswith("completion template")


def test_smollm2_keeps_its_own_chat_template():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODELS / "smollm2-135m-instruct")
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert tok("Hi")["input_ids"][0] != tok.bos_token_id  # its GGUF asks for no BOS
