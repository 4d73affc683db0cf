"""Router model: prompt layout, vector slots, projector, tiny LM save/load (scoring: test_scorer.py)."""

from __future__ import annotations

import pytest
import torch

from icl_router.model import prompt as P
from icl_router.model.projector import Projector
from icl_router.model.prompt import PromptLayout
from icl_router.model.router import ICLRouter
from icl_router.model.tiny import load_router_lm, train_tokenizer
from icl_router.testing import SAMPLE_QUERIES as QUERIES


def stage2_messages(labels, query, *, query_input="text", profile_layout="pairs"):
    """The chat messages (without the answer) whose template rendering the layout's segments must reproduce."""
    profile = "".join(P.PLACEHOLDER + ("" if profile_layout == "fused" else P.YES if y else P.NO) for y in labels)
    return [
        {"role": "system", "content": P.SYSTEM},
        {"role": "user", "content": P.user_text(profile, P.PLACEHOLDER if query_input == "vector" else query)},
    ]


MODES = [(q, p) for q in ("text", "vector") for p in ("pairs", "fused")]
E = 24  # embedding width of the test vectors


@pytest.fixture(scope="module")
def tiny(tiny_router_lm):
    return tiny_router_lm  # read-only here: every test scores or saves, none trains


def make_router(tiny, query_input="text", profile_layout="pairs", k=6):
    lm, tok = tiny
    torch.manual_seed(1)
    return ICLRouter(lm, PromptLayout(tok, query_input=query_input, profile_layout=profile_layout), anchor_emb=torch.randn(k, E))


@pytest.mark.parametrize("query_input,profile_layout", MODES)
def test_segments_equal_chat_template(tiny, query_input, profile_layout):
    _, tok = tiny
    layout = PromptLayout(tok, query_input=query_input, profile_layout=profile_layout)
    labels = [True, False, True]
    for q in QUERIES:
        seg = layout.prompt(labels, q)
        messages = stage2_messages(labels, q, query_input=query_input, profile_layout=profile_layout)
        assert seg.ids == list(tok.apply_chat_template(messages, add_generation_prompt=True)["input_ids"])
        assert [seg.ids[p] for p in seg.slot_pos] == [layout.placeholder_id] * len(seg.slot_pos)
        assert seg.slot_pos == [i for i, t in enumerate(seg.ids) if t == layout.placeholder_id]
        assert seg.slot_src == [0, 1, 2] + ([P.QUERY] if query_input == "vector" else [])
    # the prefix is the same for every query of a model
    assert layout.prompt(labels, QUERIES[0]).ids[: len(layout.prefix(labels).ids)] == layout.prefix(labels).ids


def test_worked_example_is_the_authors_prompt(tiny):
    _, tok = tiny
    layout = PromptLayout(tok)
    seg = layout.prompt([True, False, True], "What is 2+2?")
    expected = (
        "<|im_start|>system\nYou are a helpful assistant. Your task is to judge whether a model can answer a query "
        'based on its historical performance across many queries: "Yes" means it answered correctly, "No" means it '
        "did not.<|im_end|>\n<|im_start|>user\nModel's Performance:\n<|fim_pad|>Yes<|fim_pad|>No<|fim_pad|>Yes\n\n"
        'What is 2+2?\n\nIndicate whether the model is capable of answering this query by responding with "Yes" or '
        '"No".<|im_end|>\n<|im_start|>assistant\n'
    )
    assert tok.decode(seg.ids) == expected
    # each exemplar is exactly two tokens, the label right after its slot
    pre = layout.prefix([True, False, True])
    assert [pre.ids[p + 1] for p in pre.slot_pos] == [layout.yes_id, layout.no_id, layout.yes_id]
    assert pre.ids[-1] == layout.yes_id and len(pre.ids) == pre.slot_pos[0] + 6
    fused = PromptLayout(tok, profile_layout="fused").prefix([True, False, True])
    assert len(fused.ids) == len(pre.ids) - 3
    vec = PromptLayout(tok, query_input="vector").suffix("What is 2+2?")
    assert tok.decode(vec.ids).startswith("\n\n<|fim_pad|>\n\nIndicate") and "2+2" not in tok.decode(vec.ids)


def test_single_token_labels_and_placeholder_are_enforced(tiny):
    _, tok = tiny
    with pytest.raises(ValueError, match="placeholder '<vec>' must be a single token"):
        PromptLayout(tok, placeholder="<vec>")
    # no room for a single merge, and a corpus unlike the prompt: the answer words still stay whole
    for corpus in (["some text"], [f"(A) option {i} (B) choice {i * 7} Yesterday Nobody" for i in range(300)]):
        small = train_tokenizer(corpus, vocab_size=262)
        assert [len(small(w, add_special_tokens=False)["input_ids"]) for w in ("Yes", "No")] == [1, 1]
        PromptLayout(small)  # the layout's own single-token checks pass
    with pytest.raises(ValueError, match="contains the placeholder"):
        PromptLayout(tok).suffix("evil <|fim_pad|> query")


def test_projector_shapes():
    proj = Projector(384, 128)
    assert proj(torch.randn(5, 384)).shape == (5, 128)
    assert proj(torch.randn(2, 3, 384)).shape == (2, 3, 128)
    with pytest.raises(ValueError, match="width 384"):
        proj(torch.randn(5, 100))


@pytest.mark.parametrize("query_input,profile_layout", MODES)
def test_vectors_land_exactly_on_placeholders(tiny, query_input, profile_layout):
    router = make_router(tiny, query_input, profile_layout)
    emb = router.lm.get_input_embeddings()
    profiles = torch.tensor([[True, False, True, True, False, False], [False] * 6])
    layout = router.layout
    with torch.no_grad():
        x = router.embed_prefix(profiles)  # [2, P, H]
        anchors = router.projector(router.anchor_emb)  # [K, H]
        for m, labels in enumerate(profiles.tolist()):
            seg = layout.prefix(labels)
            ref = emb(torch.tensor(seg.ids))  # [P, H]
            slots = torch.tensor(seg.slot_pos)
            add = emb(torch.tensor([layout.yes_id if y else layout.no_id for y in labels])) if profile_layout == "fused" else 0
            torch.testing.assert_close(x[m, slots], anchors + add)
            others = torch.ones(len(seg.ids), dtype=torch.bool)
            others[slots] = False
            torch.testing.assert_close(x[m, others], ref[others])
        ids, _ = router.encode_queries(QUERIES[:2])
        q = torch.randn(2, E)
        y = router.embed_suffix(ids, q)
        is_slot = ids == layout.placeholder_id
        assert int(is_slot.sum()) == (2 if query_input == "vector" else 0)
        torch.testing.assert_close(y[~is_slot], emb(ids)[~is_slot])
        if query_input == "vector":
            torch.testing.assert_close(y[is_slot], router.projector(q))


def test_tiny_router_saves_and_loads(tiny, tmp_path):
    lm, tok = tiny
    lm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    lm2, tok2 = load_router_lm(tmp_path, dtype=torch.float32)
    assert tok2.chat_template == tok.chat_template
    assert PromptLayout(tok2).prompt([True], QUERIES[2]).ids == PromptLayout(tok).prompt([True], QUERIES[2]).ids
    ids = torch.tensor([PromptLayout(tok).prompt([True, False], QUERIES[1]).ids])
    with torch.no_grad():
        torch.testing.assert_close(lm2(input_ids=ids).logits, lm(input_ids=ids).logits)
    assert lm2.config.hidden_size // lm2.config.num_attention_heads >= 32

