"""Router LMs whose tokenizer lacks the prompt's tokens (model/vocab.py): SmolLM2-like (Llama, byte-level
BPE, ChatML) and Gemma-like (SentencePiece-style BPE, its own template) tiny models built from configs,
then the real converted SmolLM2 and Gemma directories (slow; skipped without runs/models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from icl_router.model import prompt as P
from icl_router.model.prompt import PromptLayout
from icl_router.model.router import ICLRouter, Pairs, pad_ids
from icl_router.model.router_dir import RouterMeta, load_router_dir, save_router_dir
from icl_router.model.tiny import CHATML_TEMPLATE, load_router_lm
from icl_router.model.vocab import add_prompt_tokens, prepare_router_lm
from icl_router.testing import SAMPLE_QUERIES as QUERIES

MODELS = Path(__file__).resolve().parents[2] / "runs" / "models"
K, E = 4, 12
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] != 'system' %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def _tokenizer(kind: str, *, vocab_size: int = 600, words: tuple[str, ...] = ("Yes", "No")):
    """A tokenizer without ``<|fim_pad|>``: ``llama`` byte-level BPE + ChatML (SmolLM2's shape) or
    ``gemma`` Metaspace BPE with byte fallback, <bos> and Gemma's turn markers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [*QUERIES, P.SYSTEM, P.PERFORMANCE, P.QUESTION, P.STAGE1_USER, " ".join(words) * 5] * 20
    if kind == "llama":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(byte_fallback=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never", split=True)
        specials = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
        alphabet = ["\n"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    if kind == "llama":
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|im_start|>")
        fast.chat_template = CHATML_TEMPLATE
    else:
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", bos_token="<bos>")
        fast.chat_template = GEMMA_TEMPLATE
    return fast


def _lm(kind: str, tokenizer):
    """A tiny random LlamaForCausalLM / Gemma3ForCausalLM from a config, sized to ``tokenizer``."""
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    shape = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=32, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                 eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, max_position_embeddings=2048)
    config = LlamaConfig(**shape) if kind == "llama" else Gemma3TextConfig(**shape, sliding_window=512)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


@pytest.fixture(scope="module", params=["llama", "gemma"])
def lm_dir(request, tmp_path_factory):
    kind = request.param
    tok = _tokenizer(kind)
    assert len(tok(P.PLACEHOLDER, add_special_tokens=False)["input_ids"]) > 1  # the case the layout used to refuse
    d = tmp_path_factory.mktemp(f"lm-{kind}")
    _lm(kind, tok).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_placeholder_is_added_and_its_row_is_the_mean_embedding(lm_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    raw = AutoTokenizer.from_pretrained(lm_dir)
    with pytest.raises(ValueError, match="must be a single token"):
        PromptLayout(raw)
    before = AutoModelForCausalLM.from_pretrained(lm_dir).get_input_embeddings().weight.detach()
    lm, tok = load_router_lm(lm_dir)
    layout = PromptLayout(tok, query_input="vector")
    assert layout.placeholder_id == len(raw) == before.shape[0]  # appended after the vocabulary
    w = lm.get_input_embeddings().weight.detach()
    assert w.shape[0] == len(tok) == lm.config.vocab_size == before.shape[0] + 1
    assert torch.equal(w[:-1], before)  # the old rows are untouched
    torch.testing.assert_close(w[layout.placeholder_id], before.mean(0))
    assert lm.get_output_embeddings().weight.shape[0] == w.shape[0]  # the tied head grew with it
    assert tok.decode([layout.yes_id]) == P.YES and tok.decode([layout.no_id]) == P.NO


def test_segments_are_the_chat_template_rendering(lm_dir):
    _, tok = load_router_lm(lm_dir)
    for query_input in ("text", "vector"):
        layout = PromptLayout(tok, query_input=query_input)
        for labels, query in (([True, False, True], QUERIES[0]), ([False], QUERIES[1])):
            profile = "".join(P.PLACEHOLDER + (P.YES if y else P.NO) for y in labels)
            body = P.PLACEHOLDER if query_input == "vector" else query
            msgs = [{"role": "system", "content": P.SYSTEM}, {"role": "user", "content": P.user_text(profile, body)}]
            want = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            assert layout.prompt(labels, query).ids == list(want)
    seg, n_prompt = PromptLayout(tok).stage1(QUERIES[2])
    assert seg.ids.count(PromptLayout(tok).placeholder_id) == 1 and n_prompt < len(seg.ids)


def test_router_dir_round_trip_keeps_the_added_token(lm_dir, tmp_path):
    lm, tok = load_router_lm(lm_dir)
    layout = PromptLayout(tok, query_input="vector")
    torch.manual_seed(0)
    router = ICLRouter(lm, layout, anchor_emb=torch.randn(K, E), anchor_evidence=True).eval()
    with torch.no_grad():
        router.evidence.lm_weight.fill_(1.0)  # the LM's logit counts
    anchors = [f"a{i}" for i in range(K)]
    meta = RouterMeta("emb", E, "vector", "pairs", layout.placeholder_id, layout.yes_id, layout.no_id, anchors, anchor_evidence=True)
    pool = {"m0": np.array([1, 0, 1, 1], bool), "m1": np.array([0, 0, 1, 0], bool)}
    out = save_router_dir(router, tmp_path / "router", meta=meta, pool=pool)
    loaded = load_router_dir(out)  # load_router_lm again: the saved tokenizer has it, nothing is added twice
    assert len(loaded.router.layout.tokenizer) == len(tok) and loaded.router.lm.config.vocab_size == len(tok)
    assert loaded.router.placeholder_id == layout.placeholder_id
    profiles = torch.tensor(np.stack(list(pool.values())))
    ids, lens = pad_ids([layout.suffix("").ids] * 3, 0)
    pairs = Pairs(profiles, torch.tensor([0, 1, 1]), ids, lens, query_emb=torch.randn(3, E))
    with torch.no_grad():
        ref = router.forward_pairs(pairs)
        torch.testing.assert_close(loaded.router.forward_pairs(pairs), ref)
        torch.testing.assert_close(loaded.router.forward_shared(pairs), ref, atol=1e-5, rtol=1e-4)  # the training path


def test_split_answer_words_become_whole_tokens(tmp_path):
    tok = _tokenizer("llama", vocab_size=300, words=("Maybe",))  # too few merges for "Yes" / "No" to be one token each
    pieces = {w: tok(w, add_special_tokens=False)["input_ids"] for w in (P.YES, P.NO)}
    assert all(len(v) > 1 for v in pieces.values())
    lm = _lm("llama", tok)
    before = lm.get_input_embeddings().weight.detach().clone()
    added = prepare_router_lm(lm, tok)
    assert list(added) == [P.PLACEHOLDER, P.YES, P.NO]
    layout = PromptLayout(tok)
    w = lm.get_input_embeddings().weight.detach()
    for word, new_id in ((P.YES, layout.yes_id), (P.NO, layout.no_id)):
        torch.testing.assert_close(w[new_id], before[pieces[word]].mean(0))  # starts at its pieces' mean
    assert tok("Yesterday", add_special_tokens=False)["input_ids"] != [layout.yes_id]  # a whole-word token only
    assert add_prompt_tokens(tok) == {}  # idempotent


def test_a_tokenizer_that_has_them_is_left_alone(tiny_router_lm):
    lm, tok = tiny_router_lm
    n, rows = len(tok), lm.get_input_embeddings().weight.shape[0]
    assert prepare_router_lm(lm, tok) == {}
    assert len(tok) == n and lm.get_input_embeddings().weight.shape[0] == rows


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma-3-270m"])
def test_real_converted_lm_routes_and_round_trips(name, tmp_path):
    """The converted real LMs (`icl-router models`): the placeholder is added, the shared-prefix path
    equals the per-pair one, and the router directory reloads with the same ids and scores."""
    if not (MODELS / name / "config.json").is_file():
        pytest.skip(f"{MODELS / name} is absent (make models)")
    lm, tok = load_router_lm(MODELS / name)
    layout = PromptLayout(tok, query_input="vector")
    assert tok.convert_ids_to_tokens(layout.placeholder_id) == P.PLACEHOLDER
    assert lm.get_input_embeddings().weight.shape[0] >= len(tok)
    torch.manual_seed(0)
    router = ICLRouter(lm, layout, anchor_emb=torch.randn(K, 384)).eval()
    anchors = [f"a{i}" for i in range(K)]
    meta = RouterMeta("emb", 384, "vector", "pairs", layout.placeholder_id, layout.yes_id, layout.no_id, anchors)
    pool = {"m0": np.array([1, 0, 1, 1], bool), "m1": np.array([0, 1, 1, 0], bool)}
    loaded = load_router_dir(save_router_dir(router, tmp_path / "router", meta=meta, pool=pool))
    assert (loaded.meta.placeholder_id, loaded.router.placeholder_id) == (layout.placeholder_id, layout.placeholder_id)
    ids, lens = pad_ids([layout.suffix("").ids] * 2, 0)
    pairs = Pairs(torch.tensor(np.stack(list(pool.values()))), torch.tensor([0, 1]), ids, lens, query_emb=torch.randn(2, 384))
    with torch.no_grad():
        ref = router.forward_pairs(pairs)
        torch.testing.assert_close(router.forward_shared(pairs), ref, atol=1e-4, rtol=1e-3)
        torch.testing.assert_close(loaded.router.forward_pairs(pairs), ref, atol=1e-4, rtol=1e-3)
