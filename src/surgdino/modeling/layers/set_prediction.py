"""Set prediction with a class-target abstraction, shared by MaskDINO's and GroundingDINO's matchers and losses.

A target's class is one of:

* ``labels [N]`` (int64) — closed-set classes: the one-hot rows of a ``[B, Q, C]`` logit tensor;
* ``class_vectors [N, C]`` (float) — one vector per target over the logit columns, e.g. GroundingDINO's
  positive token map of the target's phrase (1 at the phrase's tokens). The matching cost averages the
  per-column class cost with the vector normalised to sum 1; the focal loss uses the vector as given.

An output may carry ``logit_mask [B, C]`` (bool, True = a real column: a class, or a text token that is
not padding); masked columns add nothing to the cost or the loss. One-hot labels without a mask are
exactly the closed-set computation (same values, bit for bit).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from surgdino import comm


def class_targets_of(target: dict) -> torch.Tensor:
    """``class_vectors [N, C]`` when the target has them, else ``labels [N]``."""
    vectors = target.get("class_vectors")
    return vectors if vectors is not None else target["labels"]


def focal_class_cost(logits: torch.Tensor, classes: torch.Tensor, alpha: float, gamma: float,
                     logit_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``logits [Q, C]`` against ``classes`` (``labels [N]`` or ``class_vectors [N, C]``) → ``[Q, N]``:
    focal loss of "positive" minus that of "negative", per column, picked (labels) or averaged with the
    normalised vector; ``logit_mask [C]`` zeroes the columns that are not real."""
    prob = logits.sigmoid()
    neg = (1 - alpha) * prob.pow(gamma) * F.softplus(logits)  # -log(1 - p)
    pos = alpha * (1 - prob).pow(gamma) * F.softplus(-logits)  # -log(p)
    cost = pos - neg  # [Q, C]
    if logit_mask is not None:
        cost = cost.masked_fill(~logit_mask.bool(), 0.0)
    if classes.dtype.is_floating_point:
        weights = classes.to(cost.dtype)
        return cost @ (weights / weights.sum(-1, keepdim=True).clamp(min=1e-6)).T
    return cost[:, classes]


def class_target_tensor(logits: torch.Tensor, targets: list[dict], batch_idx: torch.Tensor,
                        query_idx: torch.Tensor, target_idx: list[torch.Tensor]) -> torch.Tensor:
    """Focal-loss targets ``[B, Q, C]`` (zeros but at matched queries): matched pair ``k`` (query
    ``query_idx[k]`` of image ``batch_idx[k]``) gets its target's one-hot row or class vector.
    ``target_idx`` holds per image the matched target indices, in the order of the pairs."""
    out = torch.zeros_like(logits)
    if batch_idx.numel():
        if targets[0].get("class_vectors") is not None:
            vectors = torch.cat([t["class_vectors"][j] for t, j in zip(targets, target_idx)])
            out[batch_idx, query_idx] = vectors.to(out.dtype)
        else:
            labels = torch.cat([t["labels"][j] for t, j in zip(targets, target_idx)])
            out[batch_idx, query_idx, labels] = 1.0
    return out


def focal_loss_sum(logits: torch.Tensor, target: torch.Tensor, alpha: float, gamma: float,
                   logit_mask: torch.Tensor | None = None) -> tuple[torch.Tensor]:
    """Summed sigmoid focal loss of ``logits, target [B, Q, C]``; ``logit_mask [B, C]`` drops columns.
    A one-tuple, the form ``criterion._eager`` takes."""
    if logit_mask is None:
        return (sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="sum"),)
    loss = sigmoid_focal_loss(logits, target, alpha=alpha, gamma=gamma, reduction="none")
    return ((loss * logit_mask[:, None].to(loss.dtype)).sum(),)


def num_boxes(targets: list[dict], device: torch.device) -> float:
    """The loss normaliser: ground-truth instances per rank, averaged over ranks, at least 1."""
    num = torch.as_tensor(float(sum(int(t["labels"].numel()) for t in targets)), device=device)
    return max(float(comm.all_reduce_mean(num).item()), 1.0)
