"""MaskDINO parts: point sampling, matcher, criterion, denoising, pixel decoder, feature-level config checks."""

import pytest
import torch

from surgdino.config import load_config
from surgdino.errors import ConfigError
from surgdino.modeling.backbone.base import ShapeSpec
from surgdino.modeling.layers.geometry import masks_to_boxes
from surgdino.modeling.layers.point_sampling import point_sample, sample_binary_masks
from surgdino.modeling.maskdino.criterion import SetCriterion
from surgdino.modeling.maskdino.dn import prepare_for_dn
from surgdino.modeling.maskdino.matcher import HungarianMatcher
from surgdino.modeling.pixel_decoder import MaskDINOEncoder


def _targets(h=32, w=48):
    masks = torch.zeros(3, h, w, dtype=torch.bool)
    masks[0, 2:10, 3:20] = True
    masks[1, 15:30, 5:12] = True
    masks[2, 5:25, 30:45] = True
    xyxy = masks_to_boxes(masks)
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    cxcywh = torch.cat([(xyxy[:, :2] + xyxy[:, 2:]) / 2, xyxy[:, 2:] - xyxy[:, :2]], 1) / scale
    return {"labels": torch.tensor([2, 0, 1]), "boxes": cxcywh, "masks": masks}


def test_sample_binary_masks_equals_grid_sample():
    m = torch.rand(5, 37, 29) > 0.5
    idx = torch.tensor([0, 3, 3, 4])
    c = torch.rand(4, 100, 2) * 1.2 - 0.1
    ref = point_sample(m[idx, None].float(), c)[:, 0]
    assert torch.allclose(sample_binary_masks(m, idx, c), ref, atol=1e-5)


def test_points_of_features_equal_points_of_masks():
    feats = torch.randn(2, 8, 16, 16)
    emb = torch.randn(2, 5, 8)
    c = torch.rand(2, 50, 2)
    masks = torch.einsum("bqd,bdhw->bqhw", emb, feats)
    a = point_sample(masks, c)  # [B, Q, P]
    b = torch.einsum("bqd,bdp->bqp", emb, point_sample(feats, c))
    assert torch.allclose(a, b, atol=1e-4)


def test_masks_to_boxes_empty_and_full():
    m = torch.zeros(2, 4, 5, dtype=torch.bool)
    m[1, 1:3, 2:4] = True
    assert masks_to_boxes(m).tolist() == [[0, 0, 0, 0], [2, 1, 4, 3]]


def test_matcher_recovers_ground_truth_and_handles_empty():
    t = _targets()
    h, w = t["masks"].shape[-2:]
    q, c = 6, 3
    perm = torch.tensor([4, 1, 5])  # queries holding targets 0, 1, 2
    logits = torch.full((1, q, c), -5.0)
    logits[0, perm, t["labels"]] = 5.0
    boxes = torch.full((1, q, 4), 0.5)
    boxes[0, perm] = t["boxes"]
    # mask features = the target masks themselves; embeddings pick them (one-hot × 20, shifted)
    feats = (t["masks"].float() * 2 - 1)[None]  # [1, 3, h, w]
    emb = torch.zeros(1, q, 3)
    emb[0, perm, torch.arange(3)] = 20.0
    out = {"pred_logits": logits, "pred_boxes": boxes, "pred_embeds": emb, "mask_features": feats}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4),
             "masks": torch.zeros(0, h, w, dtype=torch.bool)}
    matcher = HungarianMatcher(num_points=256)
    (src, tgt), = matcher(out, [t])
    assert dict(zip(tgt.tolist(), src.tolist())) == {0: 4, 1: 1, 2: 5}
    (src, tgt), = matcher(out, [empty])
    assert src.numel() == 0 and tgt.numel() == 0


def test_criterion_finite_with_empty_image_and_gradients():
    t = _targets()
    h, w = t["masks"].shape[-2:]
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4),
             "masks": torch.zeros(0, h, w, dtype=torch.bool)}
    q, c, d = 8, 3, 16
    logits = torch.randn(2, q, c, requires_grad=True)
    boxes = torch.rand(2, q, 4).clamp(0.1, 0.9).requires_grad_()
    emb = torch.randn(2, q, d, requires_grad=True)
    feats = torch.randn(2, d, h // 4, w // 4, requires_grad=True)
    out = {"pred_logits": logits, "pred_boxes": boxes, "pred_embeds": emb, "mask_features": feats}
    out["aux_outputs"] = [dict(out)]
    crit = SetCriterion(num_classes=c, matcher=HungarianMatcher(num_points=64), num_points=64,
                        weight_dict={"loss_ce": 4.0, "loss_mask": 5.0, "loss_dice": 5.0, "loss_bbox": 5.0,
                                     "loss_giou": 2.0})
    for targets in ([t, empty], [empty, empty]):
        losses = crit(out, targets)
        assert {"loss_ce", "loss_mask", "loss_dice", "loss_bbox", "loss_giou", "loss_ce_0"} <= set(losses)
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()
        assert torch.isfinite(emb.grad).all() and torch.isfinite(feats.grad).all()
    # nothing to match: box and mask losses are exactly 0 (still in the graph); the class loss pushes all down
    for k in ("loss_bbox", "loss_giou", "loss_mask", "loss_dice", "loss_bbox_0", "loss_mask_0"):
        assert losses[k].item() == 0.0, k
    assert losses["loss_ce"] > 0


def test_dn_keeps_one_group_on_dense_images():
    labels = torch.arange(30) % 5
    boxes = torch.rand(30, 4) * 0.5 + 0.25
    dn = prepare_for_dn([{"labels": labels, "boxes": boxes}], dn_num=10, noise_scale=0.4, label_noise_ratio=0.2,
                        num_classes=5, label_enc=torch.nn.Embedding(5, 8), num_queries=7)
    assert dn is not None and dn.num_groups == 1 and dn.size == 30
    assert dn.attn_mask.shape == (37, 37) and dn.attn_mask[30:, :30].all() and not dn.attn_mask[:30, :30].any()
    dn = prepare_for_dn([{"labels": labels[:3], "boxes": boxes[:3]}], dn_num=10, noise_scale=0.4,
                        label_noise_ratio=0.2, num_classes=5, label_enc=torch.nn.Embedding(5, 8), num_queries=7)
    assert dn.num_groups == 3 and dn.attn_mask[0, 3] and not dn.attn_mask[0, 1]


def test_pixel_decoder_shapes_and_levels():
    shp = {"res2": ShapeSpec(16, 4), "res3": ShapeSpec(32, 8), "res4": ShapeSpec(64, 16), "res5": ShapeSpec(64, 32)}
    for enc_in in (["res3", "res4", "res5"], ["res2", "res3", "res4", "res5"]):
        enc = MaskDINOEncoder(input_shape=shp, transformer_in_features=enc_in, conv_dim=32, mask_dim=24,
                              enc_layers=1, num_heads=4, dim_feedforward=64, total_num_feature_levels=len(enc_in) + 1)
        b, h, w = 2, 64, 96
        feats = {k: torch.randn(b, s.channels, h // s.stride, w // s.stride) for k, s in shp.items()}
        pad = torch.zeros(b, h, w, dtype=torch.bool)
        pad[1, 32:] = True
        mf, outs, masks = enc(feats, pad)
        assert mf.shape == (2, 24, 16, 24) and len(outs) == len(enc_in) + 1
        assert torch.isfinite(mf).all() and (mf[1, :, 8:] == 0).all()


def test_feature_level_keys_act_or_fail():
    from surgdino.config.keys.maskdino import encoder_in_features

    cfg = load_config(None, ["MODEL.SEM_SEG_HEAD.NUM_FEATURE_LEVELS", "4"])
    assert encoder_in_features(cfg) == ["res2", "res3", "res4", "res5"]
    with pytest.raises(ConfigError, match="NUM_FEATURE_LEVELS"):
        load_config(None, ["MODEL.SEM_SEG_HEAD.NUM_FEATURE_LEVELS", "2",
                           "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES", "[res2, res3, res4]"])
    with pytest.raises(ConfigError, match="TOTAL_NUM_FEATURE_LEVELS"):
        load_config(None, ["MODEL.SEM_SEG_HEAD.NUM_FEATURE_LEVELS", "4",
                           "MODEL.SEM_SEG_HEAD.TOTAL_NUM_FEATURE_LEVELS", "3"])


def test_postprocess_topk_threshold_overlap_and_original_size():
    from surgdino.modeling.maskdino.postprocess import InstancePostProcessor

    d = 3
    feats = torch.zeros(d, 16, 16)  # padded 64×64 input, image 32×48 inside it
    feats[0, :4, :6] = 1.0
    feats[1, 4:8, :12] = 1.0
    feats[2] = -1.0
    emb = torch.tensor([[10.0, 0, 0], [10.0, 0, 0.01], [0, 10.0, 0], [0, 0, 10.0]]) - torch.tensor([0, 0, 0.0])
    emb[:, 2] += 5.0  # background offset: feature 2 is -1 everywhere
    logits = torch.tensor([[3.0, -9], [2.0, -9], [-9, 1.0], [-9, -9]])
    boxes = torch.tensor([[0.25, 0.25, 0.5, 0.5]] * 4)
    pp = InstancePostProcessor(detections_per_image=300, overlap_threshold=0.6, score_threshold=0.05)
    out = pp(logits, boxes, emb, feats, image_size=(32, 48), padded_size=(64, 64), out_size=(64, 96))
    assert out["masks"].shape[1:] == (64, 96) and out["masks"].dtype == torch.bool
    # query 1 duplicates query 0's mask with a lower score → dropped; query 3 scores ~0 → dropped
    assert out["labels"].tolist() == [0, 1] and len(out["scores"]) == 2
    assert torch.allclose(out["boxes"][0], torch.tensor([0.0, 0.0, 48.0, 32.0]))
    assert out["masks"][0, :28, :44].all() and not out["masks"][0, 36:].any()
    off = InstancePostProcessor(detections_per_image=5, overlap_threshold=1.0, keep_empty_masks=True)
    assert len(off(logits, boxes, emb, feats, (32, 48), (64, 64), (64, 96))["scores"]) == 5
    one = InstancePostProcessor(detections_per_image=300, overlap_threshold=1.0, one_label_per_query=True,
                                keep_empty_masks=True)  # query 3's mask is empty
    assert len(one(logits, boxes, emb, feats, (32, 48), (64, 64), (64, 96))["scores"]) == 4


def test_msda_gradients_equal_plain_grid_sample_autograd():
    """The memory-light autograd function of deformable attention gives the gradients of the plain
    grid_sample + weighting formulation (value, locations and weights)."""
    import torch.nn.functional as F

    from surgdino.modeling.layers import ms_deform_attn_core

    def plain(value, shapes, locs, weights):
        B, S, nH, C = value.shape
        Q = locs.shape[1]
        out = 0
        for lvl, (v, (h, w)) in enumerate(zip(value.split([h * w for h, w in shapes], 1), shapes)):
            v = v.flatten(2).transpose(1, 2).reshape(B * nH, C, h, w)
            g = (2 * locs[:, :, :, lvl] - 1).transpose(1, 2).flatten(0, 1)  # [B*nH, Q, P, 2]
            s = F.grid_sample(v, g, align_corners=False)  # [B*nH, C, Q, P]
            out = out + (s * weights[:, :, :, lvl].transpose(1, 2).flatten(0, 1)[:, None]).sum(-1)
        return out.reshape(B, nH * C, Q).transpose(1, 2)

    g = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (3, 5), (2, 2)]
    B, Q, nH, C, P = 2, 7, 2, 3, 3
    S = sum(h * w for h, w in shapes)
    value = torch.randn(B, S, nH, C, generator=g, dtype=torch.float64, requires_grad=True)
    locs = (torch.rand(B, Q, nH, 3, P, 2, generator=g, dtype=torch.float64) * 1.4 - 0.2).requires_grad_()
    weights = torch.rand(B, Q, nH, 3, P, generator=g, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(B, Q, nH * C, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad((ms_deform_attn_core(value, shapes, locs, weights) * grad_out).sum(),
                               (value, locs, weights))
    ref = torch.autograd.grad((plain(value, shapes, locs, weights) * grad_out).sum(), (value, locs, weights))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    # only some inputs need gradients (e.g. frozen values)
    (gl,) = torch.autograd.grad((ms_deform_attn_core(value.detach(), shapes, locs, weights) * grad_out).sum(), locs)
    torch.testing.assert_close(gl, ref[1])


def test_mask_bce_cost_equals_pairwise_bce():
    from surgdino.modeling.maskdino.matcher import mask_bce_cost

    logits = torch.randn(5, 40) * 4
    t = (torch.rand(3, 40) > 0.5).float()
    ref = torch.stack([torch.stack([torch.nn.functional.binary_cross_entropy_with_logits(logits[q], t[n])
                                    for n in range(3)]) for q in range(5)])
    assert torch.allclose(mask_bce_cost(logits, t), ref, atol=1e-5)


def test_eager_loss_gradients_equal_plain_autograd():
    """Mask and class losses keep their gradients instead of their intermediates: same values and grads."""
    from surgdino.modeling.layers.set_prediction import focal_loss_sum as _focal_sum
    from surgdino.modeling.maskdino.criterion import _eager, _mask_point_losses

    g = torch.Generator().manual_seed(0)
    m = torch.randn(3, 16, 16, generator=g, dtype=torch.float64, requires_grad=True)
    coords = torch.rand(3, 50, 2, generator=g, dtype=torch.float64)
    t = (torch.rand(3, 50, generator=g) > 0.5).double()
    w = torch.tensor([2.0, 3.0], dtype=torch.float64)
    a = _eager(_mask_point_losses, m, coords, t)
    b = _mask_point_losses(m, coords, t)
    (ga,) = torch.autograd.grad((torch.stack(a) * w).sum(), m)
    (gb,) = torch.autograd.grad((torch.stack(b) * w).sum(), m)
    torch.testing.assert_close(torch.stack(a), torch.stack(b).detach())
    torch.testing.assert_close(ga, gb)
    logits = torch.randn(2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    onehot = (torch.rand(2, 5, 7, generator=g) > 0.8).double()
    (ga,) = torch.autograd.grad(_eager(_focal_sum, logits, onehot, 0.25, 2.0)[0], logits)
    (gb,) = torch.autograd.grad(_focal_sum(logits, onehot, 0.25, 2.0)[0], logits)
    torch.testing.assert_close(ga, gb)


def test_keys_that_select_nothing_accept_only_their_value_and_names_select_through_registries():
    from surgdino.modeling import build_model

    for key, bad in (("MODEL.MaskDINO.PRE_NORM", "True"), ("MODEL.MaskDINO.NO_OBJECT_WEIGHT", "0.2"),
                     ("MODEL.SEM_SEG_HEAD.NAME", "OtherHead"), ("MODEL.MaskDINO.TEST.INSTANCE_ON", "False")):
        with pytest.raises(ConfigError, match=f"{key} = .* is not supported: only"):
            load_config(None, [key, bad])
    with pytest.raises(ConfigError, match="PIXEL_DECODER_NAME = 'FPN': no pixel decoder named 'FPN'"):
        build_model(load_config(None, ["MODEL.BACKBONE.NAME", "convnext_atto",
                                       "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME", "FPN"]))
