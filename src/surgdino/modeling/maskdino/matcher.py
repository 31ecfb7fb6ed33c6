"""Hungarian matching of queries to ground truth: focal class, point-sampled mask BCE and dice, L1, GIoU.

Serves closed-set and text-prompted detectors alike: class costs take each target's class as a label
or a class vector, and an optional ``logit_mask`` (see ``layers.set_prediction``); without
``pred_embeds`` only class and box costs are used (GroundingDINO, DI-MaskDINO's token interaction).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from surgdino.modeling.layers.geometry import box_cxcywh_to_xyxy, generalized_box_iou
from surgdino.modeling.layers.point_sampling import point_sample, sample_binary_masks
from surgdino.modeling.layers.set_prediction import class_targets_of, focal_class_cost


def mask_bce_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean point BCE of every pair: ``logits [Q, P]``, ``targets [N, P]`` → ``[Q, N]``."""
    p = logits.shape[1]
    # softplus(-x) t + softplus(x) (1 - t) = softplus(x) - x t: one softplus and one product
    return (F.softplus(logits).sum(-1, keepdim=True) - logits @ targets.T) / max(p, 1)


def mask_dice_cost(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss of every pair: ``logits [Q, P]``, ``targets [N, P]`` → ``[Q, N]``."""
    s = logits.sigmoid()
    num = 2 * (s @ targets.T)
    den = s.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (num + 1) / (den + 1)


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets minimising a weighted sum of costs (one scipy call per image).

    Mask costs are computed at ``num_points`` uniform points shared by all queries of an image; the mask
    logits there come from sampling ``mask_features`` at the points and a dot product with each query's
    mask embedding, which equals sampling the full-resolution mask logits (bilinear sampling is linear).
    """

    def __init__(self, *, cost_class: float = 4.0, cost_mask: float = 5.0, cost_dice: float = 5.0,
                 cost_box: float = 5.0, cost_giou: float = 2.0, num_points: int = 12544,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.cost_box = cost_box
        self.cost_giou = cost_giou
        self.num_points = num_points
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def forward(self, outputs: dict, targets: list[dict], use_masks: bool = True
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``outputs``: ``pred_logits [B, Q, C]``, ``pred_boxes [B, Q, 4]`` (normalised cxcywh) and, for mask
        costs, ``pred_embeds [B, Q, D]`` with ``mask_features [B, D, h, w]``; optionally ``logit_mask [B, C]``.
        ``targets``: per image ``labels [N]`` (or also ``class_vectors [N, C]``), ``boxes [N, 4]``
        (normalised cxcywh), ``masks [N, H, W]`` (padded batch size; only for mask costs).
        Returns per image ``(query indices, target indices)``, int64.
        """
        logits = outputs["pred_logits"].float()
        boxes = outputs["pred_boxes"].float()
        bsz, nq = logits.shape[:2]
        device = logits.device
        logit_mask = outputs.get("logit_mask")
        use_masks = use_masks and "pred_embeds" in outputs and self.cost_mask + self.cost_dice > 0
        point_logits = None
        if use_masks:
            coords = torch.rand(bsz, self.num_points, 2, device=device)  # [B, P, 2]
            feats = point_sample(outputs["mask_features"].float(), coords)  # [B, D, P]
            point_logits = torch.einsum("bqd,bdp->bqp", outputs["pred_embeds"].float(), feats)  # [B, Q, P]
        indices = []
        for b, tgt in enumerate(targets):
            n = int(tgt["labels"].numel())
            if n == 0:
                empty = torch.empty(0, dtype=torch.int64)
                indices.append((empty, empty.clone()))
                continue
            cost = self.cost_class * focal_class_cost(logits[b], class_targets_of(tgt), self.focal_alpha,
                                                      self.focal_gamma, None if logit_mask is None else logit_mask[b])
            tgt_boxes = tgt["boxes"].float()
            cost = cost + self.cost_box * torch.cdist(boxes[b], tgt_boxes, p=1)
            cost = cost - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes[b]), box_cxcywh_to_xyxy(tgt_boxes))
            if point_logits is not None:
                rows = torch.arange(n, device=device)
                tgt_points = sample_binary_masks(tgt["masks"], rows, coords[b].expand(n, -1, -1))  # [N, P]
                cost = cost + self.cost_mask * mask_bce_cost(point_logits[b], tgt_points)
                cost = cost + self.cost_dice * mask_dice_cost(point_logits[b], tgt_points)
            cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8).reshape(nq, n).cpu()
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices
