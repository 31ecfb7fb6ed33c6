"""SetCriterion's stacked mask losses (all layers in one pass) against the per-layer reference path."""

from __future__ import annotations

import pytest
import torch

from surgdino.modeling.layers.point_sampling import (
    draw_uncertain_candidates,
    pick_uncertain_points,
    uncertain_point_coords,
)
from surgdino.modeling.maskdino.criterion import SetCriterion
from surgdino.modeling.maskdino.matcher import HungarianMatcher

Q, D, C, H, W = 12, 8, 5, 16, 20  # queries, embedding, classes, mask-feature size (non-square)
GROUPS, GROUP = 2, 4  # denoising groups and group size (most targets of an image)


def _layer(g: torch.Generator, feats: torch.Tensor, nq: int = Q) -> dict:
    b = feats.shape[0]
    return {"pred_logits": torch.randn(b, nq, C, generator=g).requires_grad_(),
            "pred_boxes": torch.rand(b, nq, 4, generator=g).mul(0.5).add(0.25).requires_grad_(),
            "pred_embeds": torch.randn(b, nq, D, generator=g).requires_grad_(), "mask_features": feats}


def _case(seed: int = 0) -> tuple[dict, list[dict]]:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(3, D, H, W, generator=g).requires_grad_()
    out = _layer(g, feats)
    out["aux_outputs"] = [_layer(g, feats) for _ in range(2)]
    out["interm_outputs"] = _layer(g, feats, nq=2 * Q)
    out["dn_outputs"] = [_layer(g, feats, nq=GROUPS * GROUP) for _ in range(3)]
    out["dn_meta"] = {"num_groups": GROUPS, "group_size": GROUP}
    targets = []
    for n in (3, 0, 4):  # one image without instances
        masks = torch.rand(n, 4 * H, 4 * W, generator=g) > 0.6
        targets.append({"labels": torch.randint(0, C, (n,), generator=g),
                        "boxes": torch.rand(n, 4, generator=g).mul(0.5).add(0.25), "masks": masks})
    return out, targets


def _criterion(batched: bool, num_points: int = 50) -> SetCriterion:
    weights = {"loss_ce": 4.0, "loss_mask": 5.0, "loss_dice": 5.0, "loss_bbox": 5.0, "loss_giou": 2.0}
    return SetCriterion(num_classes=C, matcher=HungarianMatcher(num_points=num_points), weight_dict=weights,
                        num_points=num_points, batched_masks=batched)


def _losses_and_grads(crit: SetCriterion, out: dict, targets: list[dict]):
    leaves = [out["mask_features"]] + [d["pred_embeds"] for d in [out, out["interm_outputs"], *out["aux_outputs"],
                                                                 *out["dn_outputs"]]]
    for t in leaves:
        t.grad = None
    torch.manual_seed(7)
    losses = crit(out, targets)
    sum(losses.values()).backward()
    return losses, [t.grad.clone() for t in leaves]


@pytest.mark.parametrize("chunk", [None, 200])  # None: every layer in one stack; 200 candidates: one layer a chunk
def test_stacked_mask_losses_equal_per_layer(chunk):
    out, targets = _case()
    ref, ref_grads = _losses_and_grads(_criterion(False), out, targets)
    crit = _criterion(True)
    if chunk is not None:
        crit.mask_batch_candidates = chunk
    got, got_grads = _losses_and_grads(crit, out, targets)
    assert list(got) == list(ref)  # same keys in the same order
    mask_keys = [k for k in ref if k.startswith(("loss_mask", "loss_dice"))]
    assert len(mask_keys) == 2 * (1 + 2 + 1 + 3)  # last, 2 aux, interm, 3 denoising layers
    for k in ref:
        assert torch.allclose(got[k], ref[k], rtol=1e-5, atol=1e-7), k
    assert all(float(ref[k].detach()) > 0 for k in mask_keys)
    for a, b in zip(got_grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    assert float(got_grads[0].abs().sum()) > 0


def test_stacked_mask_losses_with_no_pairs_and_without_grad():
    out, targets = _case(1)
    empty = [dict(t, labels=t["labels"][:0], boxes=t["boxes"][:0], masks=t["masks"][:0]) for t in targets]
    losses, grads = _losses_and_grads(_criterion(True), out, empty)
    assert all(float(v.detach()) == 0 for k, v in losses.items() if k.startswith(("loss_mask", "loss_dice")))
    with torch.no_grad():
        torch.manual_seed(3)
        a = _criterion(True)(out, targets)
        torch.manual_seed(3)
        b = _criterion(False)(out, targets)
    assert all(torch.allclose(a[k], b[k], rtol=1e-5) for k in b)


def test_split_draws_give_uncertain_point_coords():
    """Drawing layer after layer, then picking all rows at once, gives the points of uncertain_point_coords."""
    logits = [torch.randn(k, 1, 9, 11) for k in (3, 5)]
    torch.manual_seed(0)
    ref = [uncertain_point_coords(m, 40, 3.0, 0.75) for m in logits]
    torch.manual_seed(0)
    draws = [draw_uncertain_candidates(m.shape[0], 40, 3.0, 0.75, m.device) for m in logits]
    got = pick_uncertain_points(torch.cat(logits), torch.cat([c for c, _ in draws]), torch.cat([f for _, f in draws]), 30)
    assert torch.equal(got, torch.cat(ref))
