"""MaskDINO decoder: output shapes, denoising split, finite losses through the criterion, eval without DN."""

import torch

from surgdino.modeling.backbone.base import ShapeSpec
from surgdino.modeling.maskdino.criterion import SetCriterion
from surgdino.modeling.maskdino.decoder import MaskDINODecoder
from surgdino.modeling.maskdino.matcher import HungarianMatcher
from surgdino.modeling.pixel_decoder import MaskDINOEncoder
from surgdino.registry import DECODER_REGISTRY


def test_decoder_train_and_eval():
    torch.manual_seed(0)
    shp = {"res2": ShapeSpec(16, 4), "res3": ShapeSpec(32, 8), "res4": ShapeSpec(64, 16), "res5": ShapeSpec(64, 32)}
    enc = MaskDINOEncoder(input_shape=shp, transformer_in_features=["res3", "res4", "res5"], conv_dim=32,
                          mask_dim=32, enc_layers=1, num_heads=4, dim_feedforward=64)
    assert DECODER_REGISTRY.get("MaskDINODecoder") is MaskDINODecoder
    dec = MaskDINODecoder(num_classes=5, hidden_dim=32, num_queries=10, nheads=4, dim_feedforward=64,
                          dec_layers=2, mask_dim=32, dn_num=6)
    b, h, w = 2, 64, 96
    feats = {k: torch.randn(b, s.channels, h // s.stride, w // s.stride) for k, s in shp.items()}
    pad = torch.zeros(b, h, w, dtype=torch.bool)
    pad[1, 32:] = True
    mf, outs, masks = enc(feats, pad)
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]]),
                "masks": torch.rand(2, h, w) > 0.5},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4),
                "masks": torch.zeros(0, h, w, dtype=torch.bool)}]
    sizes = torch.tensor([[64, 96], [32, 96]])
    out = dec(outs, masks, mf, sizes, (64, 96), targets)
    assert out["pred_logits"].shape == (2, 10, 5) and out["pred_boxes"].shape == (2, 10, 4)
    assert len(out["aux_outputs"]) == 2 and len(out["dn_outputs"]) == 3  # initial + 2 layers
    assert out["dn_meta"] == {"num_groups": 3, "group_size": 2}
    # class prior: initial probabilities are CLASS_PRIOR_PROB-like, so the first focal loss is moderate
    assert out["interm_outputs"]["pred_logits"].sigmoid().mean() < 0.1
    crit = SetCriterion(num_classes=5, matcher=HungarianMatcher(num_points=64), num_points=64,
                        weight_dict={"loss_ce": 4.0})
    losses = crit(out, targets)
    assert {"loss_ce_dn", "loss_mask_dn", "loss_ce_interm", "loss_dice_1"} <= set(losses)
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    dec.eval()
    with torch.no_grad():
        out = dec(outs, masks, mf, sizes, (64, 96))
    assert "dn_outputs" not in out and out["pred_embeds"].shape == (2, 10, 32)


def test_mask_boxes_keep_the_encoder_box_for_empty_masks():
    """mask2box: a query whose predicted mask is empty keeps its fallback (encoder) box instead of the
    (0, 0, 0, 0) of an empty mask, which would start it at the image's corner with no size."""
    from surgdino.modeling.layers import inverse_sigmoid
    from surgdino.modeling.layers.box_refine import DecoderInputs

    dec = MaskDINODecoder(num_classes=3, hidden_dim=16, num_queries=2, nheads=2, dim_feedforward=16,
                          dec_layers=1, mask_dim=1)
    mf = -torch.ones(1, 1, 8, 16)  # [B, Dm, h, w]
    mf[0, 0, 2:4, 4:12] = 1.0  # positive logits for a positive embedding: a box x 4..12, y 2..4
    inputs = DecoderInputs(memory=torch.zeros(1, 1, 16), memory_mask=torch.zeros(1, 1, dtype=torch.bool),
                           shapes=[(1, 1)], ratios=torch.ones(1, 1, 2), mask_features=mf,
                           feat_sizes=torch.tensor([[8.0, 16.0]]))
    embeds = torch.tensor([[[1.0], [0.0]]])  # query 0: that mask; query 1: logits 0 everywhere, an empty mask
    fallback = inverse_sigmoid(torch.tensor([[[0.3, 0.6, 0.2, 0.1], [0.7, 0.4, 0.25, 0.5]]]))
    boxes = dec.mask_boxes(embeds, inputs, fallback).sigmoid()
    assert torch.allclose(boxes[0, 0], torch.tensor([0.5, 0.375, 0.5, 0.25]), atol=1e-4)  # cxcywh of the mask
    assert torch.allclose(boxes[0, 1], fallback[0, 1].sigmoid(), atol=1e-6)
