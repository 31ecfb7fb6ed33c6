"""Test-time augmentation for instance segmentation: several scales and horizontal flips, merged by mask overlap.

Each test image is resized to every shortest-edge size (longest edge capped) and, optionally,
also flipped; the wrapped model returns each view's detections in original-image pixels (the
input's ``height``/``width`` are passed through), flipped views are flipped back, and all
detections are merged per class, greedily by score:

- a detection whose mask IoU with a higher-scoring kept one (same class) is ``>= merge_iou``
  joins that one's cluster (IoU of masks block-averaged to at most ~``iou_size`` pixels a side,
  computed by a matmul within each class);
- a cluster's mask is the score-weighted vote of its members' masks (``> 0.5``), its box the box
  of that mask (the score-weighted mean box if the vote is empty);
- its score (``score_merge``): ``"vote"`` (default) sums, over views, the best member score from
  each view and divides by the number of views, so a detection found in every view keeps its
  score and one found in a single view is down-weighted; ``"max"`` and ``"mean"`` are the
  cluster's maximum or mean member score;
- a cluster of one is kept unchanged (its own mask, box and score, except for ``"vote"``).

Then the top ``detections_per_image`` by merged score are returned, best first. With one view
(one size, no flip) the model's own output is returned unchanged. Memory: all views' masks of an
image are held at original resolution together (views x detections x H x W bytes), so on CPU keep
few scales or fewer detections per image.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from surgdino.data.transforms import shortest_edge_size
from surgdino.errors import SurgDinoError

SCORE_MERGES = ("vote", "max", "mean")


def hflip_instances(result: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """Mirror one image's detections (xyxy boxes, [K, H, W] masks) in an image ``width`` pixels wide."""
    out = dict(result)
    boxes = result["boxes"]
    out["boxes"] = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
    out["masks"] = result["masks"].flip(-1)
    return out


def downsample_masks(masks: torch.Tensor, max_side: int = 256) -> torch.Tensor:
    """``[N, H, W]`` bool masks as ``[N, h*w]`` pixel-block averages, h and w at most about ``max_side``.

    Block sums are taken in integer arithmetic on a zero-copy uint8 view, so the full-resolution
    masks are read once and never converted to float (the cost of TTA merging on CPU).
    """
    n, h, w = masks.shape
    f = max(1, -(-max(h, w) // max_side))  # block size: ceil(max side / max_side)
    if f == 1:
        return masks.float().flatten(1)  # [N, H*W]
    hb, wb = max(1, h // f), max(1, w // f)
    fy, fx = min(f, h), min(f, w)
    u = masks[:, : hb * fy, : wb * fx].contiguous().view(torch.uint8)  # [N, hb*fy, wb*fx]; trailing rows dropped
    u = u.reshape(n, hb * fy, wb, fx).sum(-1, dtype=torch.int16)  # [N, hb*fy, wb]
    u = u.reshape(n, hb, fy, wb).sum(2, dtype=torch.int32)  # [N, hb, wb]
    return (u.float() / (fy * fx)).flatten(1)  # [N, hb*wb]


def soft_iou(m: torch.Tensor) -> torch.Tensor:
    """Pairwise IoU ``[N, N]`` of ``[N, P]`` (soft) masks via one matmul."""
    inter = m @ m.T  # [N, N]
    area = m.sum(1)
    union = area[:, None] + area[None, :] - inter
    return inter / union.clamp(min=1e-6)


def mask_iou(masks: torch.Tensor, iou_size: int = 256) -> torch.Tensor:
    """Pairwise IoU ``[N, N]`` of ``[N, H, W]`` masks (block-averaged when a side exceeds ``iou_size``)."""
    return soft_iou(downsample_masks(masks, iou_size))


def _mask_box(mask: torch.Tensor) -> torch.Tensor | None:
    """xyxy box [4] (pixel edges) of an [H, W] bool mask; None when it is empty."""
    ys = torch.nonzero(mask.any(1)).flatten()
    if ys.numel() == 0:
        return None
    xs = torch.nonzero(mask.any(0)).flatten()
    return torch.stack([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]).float()


def merge_detections(boxes: torch.Tensor, masks: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor,
                     views: torch.Tensor, num_views: int, merge_iou: float = 0.7, score_merge: str = "vote",
                     iou_size: int = 256, max_dets: int | None = None) -> dict[str, torch.Tensor]:
    """Merge detections from several views of one image (see the module doc), best ``max_dets`` first.

    ``boxes`` [N, 4] xyxy, ``masks`` [N, H, W] bool, ``scores`` [N], ``labels`` [N], ``views`` [N] (view of each).
    """
    n = scores.numel()
    small = downsample_masks(masks, iou_size)  # [N, P]
    same = torch.zeros(n, n, dtype=torch.bool, device=scores.device)  # [N, N]: same class and IoU >= merge_iou
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        same[idx[:, None], idx[None, :]] = soft_iou(small[idx]) >= merge_iou
    same.fill_diagonal_(True)  # a detection always belongs to its own cluster (even with an empty mask)
    free = torch.ones(n, dtype=torch.bool, device=scores.device)
    clusters, merged_scores = [], []
    for i in scores.argsort(descending=True).tolist():  # greedy, highest score first
        if not free[i]:
            continue
        members = torch.nonzero(same[i] & free).flatten()  # [M], i among them
        members = torch.cat([members.new_tensor([i]), members[members != i]])  # the cluster's best first
        free[members] = False
        s = scores[members]
        if score_merge == "vote":
            best = torch.zeros(num_views, dtype=s.dtype, device=s.device).scatter_reduce(
                0, views[members], s, reduce="amax")  # [V]
            merged_scores.append(best.sum() / num_views)
        else:
            merged_scores.append(s.max() if score_merge == "max" else s.mean())
        clusters.append(members)
    if not clusters:
        return {"boxes": boxes[:0], "masks": masks[:0], "scores": scores[:0], "labels": labels[:0]}
    merged = torch.stack(merged_scores)  # [C]
    keep = merged.argsort(descending=True)[:max_dets].tolist()  # highest merged score first
    out_b, out_m = [], []
    for k in keep:  # masks and boxes only for the clusters that are returned
        members = clusters[k]
        i = int(members[0])
        box, mask = boxes[i].float(), masks[i]
        if members.numel() > 1:
            s = scores[members]
            w = (s / s.sum().clamp(min=1e-12)).to(torch.float32)  # [M]
            vote = torch.einsum("k,khw->hw", w, masks[members].float())  # [H, W]
            mask = vote > 0.5
            box = _mask_box(mask)
            if box is None:  # the vote is empty: fall back to the score-weighted mean box
                box = (w[:, None] * boxes[members].float()).sum(0)
        out_b.append(box)
        out_m.append(mask)
    first = torch.stack([clusters[k][0] for k in keep])
    return {"boxes": torch.stack(out_b), "masks": torch.stack(out_m), "scores": merged[keep], "labels": labels[first]}


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
    def from_config(cls, cfg: Any, model: nn.Module) -> dict:
        a = cfg.TEST.AUG
        return dict(model=model, min_sizes=list(a.MIN_SIZES), max_size=a.MAX_SIZE, flip=a.FLIP, merge_iou=a.MERGE_IOU,
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
                    self.iou_size, max_dets=self.detections_per_image)
            if merged["scores"].numel() > k:
                top = merged["scores"].topk(k).indices
                merged = {key: v[top] if isinstance(v, torch.Tensor) and v.shape[:1] == merged["scores"].shape
                          else v for key, v in merged.items()}
            results.append(merged)
        return results
