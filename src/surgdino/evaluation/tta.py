"""Test-time augmentation for instance segmentation: several scales and horizontal flips, merged by mask overlap.

Each test image is resized to every shortest-edge size (longest edge capped) and, optionally,
also flipped; the wrapped model returns each view's detections in original-image pixels (the
input's ``height``/``width`` are passed through), flipped views are flipped back, and all
detections are merged per class, greedily by score:

- a detection whose mask IoU with a higher-scoring kept one (same class) is ``>= merge_iou``
  joins that one's cluster (IoU on masks downsampled to at most ``iou_size`` pixels a side);
- a cluster's mask is the score-weighted vote of its members' masks (``> 0.5``), its box the box
  of that mask (the score-weighted mean box if the vote is empty);
- its score (``score_merge``): ``"vote"`` (default) sums, over views, the best member score from
  each view and divides by the number of views, so a detection found in every view keeps its
  score and one found in a single view is down-weighted; ``"max"`` and ``"mean"`` are the
  cluster's maximum or mean member score;
- a cluster of one is kept unchanged (its own mask, box and score, except for ``"vote"``).

Then the top ``detections_per_image`` by score are returned. With one view (one size, no flip)
the model's own output is returned unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms.v2 import functional as TF

from surgdino.errors import SurgDinoError

SCORE_MERGES = ("vote", "max", "mean")


def shortest_edge_size(h: int, w: int, min_size: int, max_size: int) -> tuple[int, int]:
    """(new_h, new_w) with the shortest edge ``min_size`` and the longest at most ``max_size``."""
    scale = min_size / min(h, w)
    if max(h, w) * scale > max_size:
        scale = max_size / max(h, w)
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def hflip_instances(result: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """Mirror one image's detections (xyxy boxes, [K, H, W] masks) in an image ``width`` pixels wide."""
    out = dict(result)
    boxes = result["boxes"]
    out["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    out["masks"] = result["masks"].flip(-1)
    return out


def mask_iou(masks: torch.Tensor, iou_size: int = 256) -> torch.Tensor:
    """Pairwise IoU ``[N, N]`` of ``[N, H, W]`` masks via one matmul (area-downsampled when larger than iou_size)."""
    m = masks.float()[:, None]  # [N, 1, H, W]
    h, w = m.shape[-2:]
    if max(h, w) > iou_size:
        s = iou_size / max(h, w)
        m = F.interpolate(m, size=(max(1, round(h * s)), max(1, round(w * s))), mode="area")
    m = m.flatten(1)  # [N, h*w] soft masks
    inter = m @ m.T  # [N, N]
    area = m.sum(1)
    union = area[:, None] + area[None, :] - inter
    return inter / union.clamp(min=1e-6)


def _mask_box(mask: torch.Tensor) -> torch.Tensor:
    """xyxy box [4] (pixel edges) of a non-empty [H, W] bool mask."""
    ys = torch.nonzero(mask.any(1)).flatten()
    xs = torch.nonzero(mask.any(0)).flatten()
    return torch.stack([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]).float()


def merge_detections(boxes: torch.Tensor, masks: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                     views: torch.Tensor, num_views: int, merge_iou: float = 0.7, score_merge: str = "vote",
                     iou_size: int = 256) -> dict[str, torch.Tensor]:
    """Merge detections from several views of one image (see the module doc). ``views`` [N]: the view of each."""
    order = scores.argsort(descending=True)
    boxes, masks, scores, labels, views = boxes[order], masks[order], scores[order], labels[order], views[order]
    n = scores.numel()
    same = (labels[:, None] == labels[None, :]) & (mask_iou(masks, iou_size) >= merge_iou)  # [N, N]
    same.fill_diagonal_(True)  # a detection always belongs to its own cluster (even with an empty mask)
    free = torch.ones(n, dtype=torch.bool, device=scores.device)
    out_b, out_m, out_s = [], [], []
    keep_labels = []
    for i in range(n):
        if not free[i]:
            continue
        members = torch.nonzero(same[i] & free).flatten()  # [M], starts with i
        free[members] = False
        s = scores[members]
        if score_merge == "vote":
            best = torch.zeros(num_views, dtype=s.dtype, device=s.device).scatter_reduce(
                0, views[members], s, reduce="amax")  # [V]
            score = best.sum() / num_views
        else:
            score = s.max() if score_merge == "max" else s.mean()
        if members.numel() == 1:
            box, mask = boxes[i], masks[i]
        else:
            w = (s / s.sum().clamp(min=1e-12)).to(torch.float32)
            vote = torch.einsum("k,khw->hw", w, masks[members].float())  # [H, W]
            mask = vote > 0.5
            box = _mask_box(mask) if mask.any() else (w[:, None] * boxes[members].float()).sum(0)
        out_b.append(box.float())
        out_m.append(mask)
        out_s.append(score)
        keep_labels.append(labels[i])
    if not out_s:
        return {"boxes": boxes[:0], "masks": masks[:0], "scores": scores[:0], "labels": labels[:0]}
    merged_scores = torch.stack(out_s)
    order = merged_scores.argsort(descending=True)  # highest merged score first
    return {"boxes": torch.stack(out_b)[order], "masks": torch.stack(out_m)[order], "scores": merged_scores[order],
            "labels": torch.stack(keep_labels)[order]}


class InstanceTTA(nn.Module):
    """Wraps an instance-segmentation model: runs every (scale, flip) view of each image and merges the results."""

    def __init__(self, model: nn.Module, min_sizes: Sequence[int], max_size: int, flip: bool = True,
                 merge_iou: float = 0.7, detections_per_image: int = 100, score_merge: str = "vote",
                 iou_size: int = 256):
        super().__init__()
        if not min_sizes or any(int(s) <= 0 for s in min_sizes) or max_size <= 0:
            raise SurgDinoError(f"TEST.AUG.MIN_SIZES {list(min_sizes)} and TEST.AUG.MAX_SIZE {max_size} must be "
                                "positive (and MIN_SIZES not empty)")
        if score_merge not in SCORE_MERGES:
            raise SurgDinoError(f"score_merge {score_merge!r}: choose one of {SCORE_MERGES}")
        if not 0.0 < merge_iou <= 1.0:
            raise SurgDinoError(f"TEST.AUG.MERGE_IOU {merge_iou} must be in (0, 1]")
        self.model = model
        self.min_sizes = [int(s) for s in min_sizes]
        self.max_size = int(max_size)
        self.flip = bool(flip)
        self.merge_iou = float(merge_iou)
        self.detections_per_image = int(detections_per_image)
        self.score_merge = score_merge
        self.iou_size = int(iou_size)

    @classmethod
    def from_config(cls, cfg: Any, model: nn.Module) -> InstanceTTA:
        a = cfg.TEST.AUG
        return cls(model, min_sizes=list(a.MIN_SIZES), max_size=a.MAX_SIZE, flip=a.FLIP, merge_iou=a.MERGE_IOU,
                   detections_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)

    def views(self) -> list[tuple[int, bool]]:
        """(min_size, flipped) of every view, in the order they are run."""
        return [(s, f) for s in self.min_sizes for f in ((False, True) if self.flip else (False,))]

    def _augment(self, d: dict[str, Any], min_size: int, flip: bool) -> dict[str, Any]:
        image = d["image"]  # [3, H, W] uint8
        size = shortest_edge_size(image.shape[-2], image.shape[-1], min_size, self.max_size)
        if tuple(image.shape[-2:]) != size:
            image = TF.resize(image, list(size), antialias=True)  # [3, h, w]
        if flip:
            image = image.flip(-1)
        out = dict(d)
        out.pop("instances", None)
        out["image"] = image
        out.setdefault("height", d["image"].shape[-2])
        out.setdefault("width", d["image"].shape[-1])
        return out

    @torch.no_grad()
    def forward(self, inputs: list[dict[str, Any]]) -> list[dict[str, torch.Tensor]]:
        views = self.views()
        per_view = []  # [V][B] results in original pixels, un-flipped
        for min_size, flip in views:
            outs = self.model([self._augment(d, min_size, flip) for d in inputs])
            if flip:
                outs = [hflip_instances(o, int(d.get("width", d["image"].shape[-1]))) for o, d in zip(outs, inputs)]
            per_view.append(outs)
        k = self.detections_per_image
        results = []
        for b in range(len(inputs)):
            dets = [per_view[v][b] for v in range(len(views))]
            if len(views) == 1:
                merged = dict(dets[0])
            else:
                counts = [int(d["scores"].numel()) for d in dets]
                view_ids = torch.repeat_interleave(torch.arange(len(views)), torch.tensor(counts))  # [N]
                merged = merge_detections(
                    torch.cat([d["boxes"] for d in dets]), torch.cat([d["masks"].bool() for d in dets]),
                    torch.cat([d["scores"] for d in dets]), torch.cat([d["labels"] for d in dets]),
                    view_ids.to(dets[0]["scores"].device), len(views), self.merge_iou, self.score_merge,
                    self.iou_size)
            if merged["scores"].numel() > k:
                top = merged["scores"].topk(k).indices
                merged = {key: v[top] if isinstance(v, torch.Tensor) and v.shape[:1] == merged["scores"].shape
                          else v for key, v in merged.items()}
            results.append(merged)
        return results
