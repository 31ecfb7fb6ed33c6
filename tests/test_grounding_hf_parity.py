"""Our GroundingDINO loaded from a transformers checkpoint returns what GroundingDinoForObjectDetection returns."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, GroundingDinoConfig, GroundingDinoForObjectDetection, SwinConfig

from surgdino.errors import SurgDinoError
from surgdino.modeling.grounding.model import GroundingDINO


def _hf_model(tmp_path, *, out_features=("stage2", "stage3", "stage4"), levels=4, enc=2, dec=2, queries=12,
              share=True, seed=0):
    torch.manual_seed(seed)
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4],
                      window_size=4, out_features=list(out_features))
    bert = BertConfig(vocab_size=1100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    cfg = GroundingDinoConfig(backbone_config=swin, text_config=bert, d_model=32, encoder_layers=enc,
                              decoder_layers=dec, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_attention_heads=4,
                              decoder_attention_heads=4, num_queries=queries, num_feature_levels=levels,
                              max_text_len=24, dropout=0.0, fusion_droppath=0.0, decoder_bbox_embed_share=share)
    model = GroundingDinoForObjectDetection(cfg).eval()
    with torch.no_grad():  # move every weight off its (often zero) initialisation so the comparison means something
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path)
    return model


def _text(batch: int):
    ids = torch.tensor([[101, 500, 501, 1012, 600, 1012, 700, 701, 702, 1012, 102, 0, 0],
                        [101, 800, 1012, 900, 901, 1012, 102, 0, 0, 0, 0, 0, 0]])[:batch]
    return ids, (ids != 0).long() | (torch.arange(ids.shape[1]) == 0).long()


def _compare(ours, hf, kwargs):
    with torch.no_grad():
        a = ours.forward_hf(**kwargs)
        b = hf(**kwargs)
    assert a["logits"].shape == b.logits.shape
    fin = torch.isfinite(b.logits)
    assert torch.equal(fin, torch.isfinite(a["logits"]))
    scale = b.logits[fin].abs().max()
    torch.testing.assert_close(a["logits"][fin], b.logits[fin], rtol=1e-4, atol=1e-4 * float(scale))
    torch.testing.assert_close(a["pred_boxes"], b.pred_boxes, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", [
    dict(),
    dict(out_features=("stage4",), levels=1, queries=9, share=False),
    dict(out_features=("stage1", "stage2", "stage3"), levels=5, enc=1, dec=3, queries=20),
])
def test_forward_hf_equals_transformers(tmp_path, arch):
    hf = _hf_model(tmp_path, **arch)
    ours = GroundingDINO.from_hf_pretrained(str(tmp_path))
    torch.manual_seed(1)
    ids, am = _text(1)
    _compare(ours, hf, dict(pixel_values=torch.randn(1, 3, 128, 128), input_ids=ids, attention_mask=am))
    # padded batch of two non-square images
    ids, am = _text(2)
    pix = torch.randn(2, 3, 128, 160)
    mask = torch.zeros(2, 128, 160, dtype=torch.long)
    mask[0, :96, :160] = 1
    mask[1, :128, :72] = 1
    pix = pix * mask[:, None]
    _compare(ours, hf, dict(pixel_values=pix, input_ids=ids, attention_mask=am, pixel_mask=mask))


def test_from_hf_pretrained_names_a_missing_folder(tmp_path):
    with pytest.raises(SurgDinoError, match="config.json"):
        GroundingDINO.from_hf_pretrained(str(tmp_path))
