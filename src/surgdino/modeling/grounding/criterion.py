"""Set prediction over text tokens: Hungarian matching with a focal cost on token maps, sigmoid focal
token loss, box L1 and GIoU, on every decoder layer and on the selected encoder proposals.

A target's class is its token map (the tokens of its name in the prompt, a row of the prompt's
positive map); logits outside the text are -inf and never enter a cost or a loss.

TODO(unify): core (issue 10) generalises MaskDINO's matcher/criterion to per-target class vectors and
a logit mask; once on main, ``TokenMatcher``/``TokenSetCriterion`` become those with token maps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from surgdino.modeling.maskdino.box_ops import (
    box_cxcywh_to_xyxy,
    generalized_box_iou,
    pairwise_generalized_box_iou,
)


def _focal_terms(logits: torch.Tensor, alpha: float, gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Focal loss of each logit if its target were 1 (pos) or 0 (neg)."""
    prob = logits.sigmoid()
    pos = alpha * (1 - prob).pow(gamma) * F.softplus(-logits)
    neg = (1 - alpha) * prob.pow(gamma) * F.softplus(logits)
    return pos, neg


class TokenMatcher(nn.Module):
    """One-to-one assignment minimising ``w_class · focal(token map) + w_bbox · L1 + w_giou · (-GIoU)``."""

    def __init__(self, cost_class: float = 1.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = focal_alpha, focal_gamma

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, boxes: torch.Tensor, text_valid: torch.Tensor, targets: list[dict]
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """logits [B, Q, Tmax], boxes [B, Q, 4] (cxcywh), text_valid [B, T]; targets: ``token_maps [N, T]``
        (rows sum to 1), ``boxes [N, 4]`` → per image (query indices, target indices)."""
        t = text_valid.shape[1]
        out = []
        for b, tgt in enumerate(targets):
            n = int(tgt["boxes"].shape[0])
            if n == 0:
                e = torch.empty(0, dtype=torch.int64)
                out.append((e, e.clone()))
                continue
            lg = logits[b, :, :t].float().masked_fill(~text_valid[b], 0.0)  # [Q, T], finite
            pos, neg = _focal_terms(lg, self.alpha, self.gamma)
            cost_tok = (pos - neg).masked_fill(~text_valid[b], 0.0)
            cost = self.cost_class * (cost_tok @ tgt["token_maps"].float().T)  # [Q, N]
            cost = cost + self.cost_bbox * torch.cdist(boxes[b].float(), tgt["boxes"].float(), p=1)
            cost = cost - self.cost_giou * generalized_box_iou(box_cxcywh_to_xyxy(boxes[b].float()),
                                                               box_cxcywh_to_xyxy(tgt["boxes"].float()))
            cost = torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8).cpu()
            rows, cols = linear_sum_assignment(cost.numpy())
            out.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return out


def _num_boxes(targets: list[dict], device: torch.device) -> float:
    n = torch.tensor(float(sum(int(t["boxes"].shape[0]) for t in targets)), device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(n)
        n = n / dist.get_world_size()
    return max(float(n), 1.0)


class TokenSetCriterion(nn.Module):
    """Weighted ``loss_ce`` (focal over text tokens), ``loss_bbox``, ``loss_giou`` for the last layer, each
    earlier layer (``_{i}``, if ``aux_loss``) and the selected encoder proposals (``_interm``)."""

    def __init__(self, matcher: TokenMatcher, *, cls_loss_coef: float = 2.0, bbox_loss_coef: float = 5.0,
                 giou_loss_coef: float = 2.0, interm_loss_coef: float = 1.0, no_interm_box_loss: bool = False,
                 aux_loss: bool = True, focal_alpha: float = 0.25, focal_gamma: float = 2.0):
        super().__init__()
        self.matcher = matcher
        self.weights = {"loss_ce": cls_loss_coef, "loss_bbox": bbox_loss_coef, "loss_giou": giou_loss_coef}
        self.interm_loss_coef = interm_loss_coef
        self.no_interm_box_loss = no_interm_box_loss
        self.aux_loss = aux_loss
        self.alpha, self.gamma = focal_alpha, focal_gamma

    def _losses(self, logits, boxes, text_valid, targets, num_boxes) -> dict[str, torch.Tensor]:
        idx = self.matcher(logits, boxes, text_valid, targets)
        t = text_valid.shape[1]
        lg = logits[:, :, :t]
        target = torch.zeros_like(lg)  # [B, Q, T] binary token targets
        src_boxes, tgt_boxes = [], []
        for b, ((qi, ti), tgt) in enumerate(zip(idx, targets)):
            qi, ti = qi.to(lg.device), ti.to(lg.device)
            target[b, qi] = (tgt["token_maps"][ti] > 0).to(lg.dtype)
            src_boxes.append(boxes[b, qi])
            tgt_boxes.append(tgt["boxes"][ti])
        valid = text_valid[:, None, :].expand_as(lg)
        x, y = lg[valid], target[valid]  # finite logits only
        prob = x.sigmoid()
        ce = F.binary_cross_entropy_with_logits(x, y, reduction="none")
        p_t = prob * y + (1 - prob) * (1 - y)
        loss = ce * (1 - p_t).pow(self.gamma)
        if self.alpha >= 0:
            loss = (self.alpha * y + (1 - self.alpha) * (1 - y)) * loss
        src, tb = torch.cat(src_boxes), torch.cat(tgt_boxes).to(boxes.dtype)
        giou = pairwise_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tb))  # [M]
        return {"loss_ce": loss.sum() / num_boxes,
                "loss_bbox": F.l1_loss(src, tb, reduction="sum") / num_boxes,
                "loss_giou": (1 - giou).sum() / num_boxes}

    def forward(self, outputs: dict, targets: list[dict]) -> dict[str, torch.Tensor]:
        """``outputs`` of ``GroundingDINODetector.forward_tensors``; targets per image ``boxes [N, 4]``
        (normalised cxcywh) and ``token_maps [N, T]``."""
        valid = outputs["text_valid"]
        nb = _num_boxes(targets, valid.device)
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]  # [L, B, Q, Tmax], [L, B, Q, 4]
        layers = range(logits.shape[0]) if self.aux_loss else [logits.shape[0] - 1]
        out = {}
        for i in layers:
            suffix = "" if i == logits.shape[0] - 1 else f"_{i}"
            for k, v in self._losses(logits[i], boxes[i], valid, targets, nb).items():
                out[k + suffix] = v * self.weights[k]
        if "enc_pred_logits" in outputs and self.interm_loss_coef > 0:
            for k, v in self._losses(outputs["enc_pred_logits"], outputs["enc_pred_boxes"], valid, targets, nb).items():
                if self.no_interm_box_loss and k != "loss_ce":
                    continue
                out[k + "_interm"] = v * self.weights[k] * self.interm_loss_coef
        return out
