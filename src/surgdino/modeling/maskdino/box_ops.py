"""Box helpers: format conversion, (generalised) IoU and boxes of binary masks, all batched."""

from __future__ import annotations

import torch
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "generalized_box_iou", "masks_to_boxes",
           "pairwise_generalized_box_iou"]


def box_cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` (cx, cy, w, h) → (x0, y0, x1, y1)."""
    return box_convert(boxes, "cxcywh", "xyxy")


def box_xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` (x0, y0, x1, y1) → (cx, cy, w, h)."""
    return box_convert(boxes, "xyxy", "cxcywh")


def pairwise_generalized_box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GIoU of matched pairs: ``a, b [N, 4]`` xyxy → ``[N]`` (no N×N matrix)."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)
    union = area_a + area_b - inter
    iou = inter / union.clamp(min=1e-7)
    hull = (torch.max(a[:, 2:], b[:, 2:]) - torch.min(a[:, :2], b[:, :2])).clamp(min=0).prod(-1)
    return iou - (hull - union) / hull.clamp(min=1e-7)


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight xyxy boxes ``[..., 4]`` of boolean masks ``[..., H, W]`` in pixel units (x1, y1 exclusive).

    Empty masks give ``(0, 0, 0, 0)``. Vectorised: no loop over masks.
    """
    h, w = masks.shape[-2:]
    rows = masks.any(-1)  # [..., H]
    cols = masks.any(-2)  # [..., W]
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)
    big = float(max(h, w) + 1)
    y0 = torch.where(rows, ys, big).amin(-1)
    y1 = torch.where(rows, ys, -1.0).amax(-1) + 1
    x0 = torch.where(cols, xs, big).amin(-1)
    x1 = torch.where(cols, xs, -1.0).amax(-1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=-1)
    return torch.where(rows.any(-1, keepdim=True), boxes, torch.zeros_like(boxes))
