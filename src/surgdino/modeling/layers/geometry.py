"""Geometry of DETR-style detectors, in one place: box formats and (generalised) IoU, boxes of binary
masks, and the token geometry of multi-scale encoders (valid ratios, reference points, proposals).

Conventions: boxes are ``[..., 4]``, normalised (cx, cy, w, h) unless named ``xyxy``; level padding
masks are ``[B, H, W]`` with True = padding (bottom/right); levels are listed in the encoder's order.
"""

from __future__ import annotations

import torch
from torchvision.ops import box_convert, generalized_box_iou

__all__ = ["box_cxcywh_to_xyxy", "box_xyxy_to_cxcywh", "encoder_proposals", "encoder_reference_points",
           "generalized_box_iou", "masks_to_boxes", "pairwise_generalized_box_iou", "valid_ratios"]


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
    big = h + w + 1  # beyond every index (a graph value under tracing, so an export follows the mask size)
    y0 = torch.where(rows, ys, big).amin(-1)
    y1 = torch.where(rows, ys, -1.0).amax(-1) + 1
    x0 = torch.where(cols, xs, big).amin(-1)
    x1 = torch.where(cols, xs, -1.0).amax(-1) + 1
    boxes = torch.stack([x0, y0, x1, y1], dim=-1)
    return torch.where(rows.any(-1, keepdim=True), boxes, torch.zeros_like(boxes))


def detr_masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """DETR's ``masks_to_boxes`` (MaskDINO's ``mask2box``): xyxy of ``masks [..., H, W]`` with x2, y2 the last
    pixel (inclusive); an empty mask gives ``(1e8, 1e8, 0, 0)``."""
    h, w = masks.shape[-2:]
    ys = torch.arange(h, device=masks.device, dtype=torch.float32)
    xs = torch.arange(w, device=masks.device, dtype=torch.float32)
    cols, rows = masks.any(-2), masks.any(-1)  # [..., W], [..., H]
    x1 = torch.where(cols, xs, 0.0).amax(-1)
    y1 = torch.where(rows, ys, 0.0).amax(-1)
    x0 = torch.where(cols, xs, 1e8).amin(-1)
    y0 = torch.where(rows, ys, 1e8).amin(-1)
    return torch.stack([x0, y0, x1, y1], -1)


def valid_ratios(masks: list[torch.Tensor]) -> torch.Tensor:
    """Per level the unpadded fraction of height and width: masks [B, H, W] → ``[B, L, 2]`` (w, h)."""
    out = []
    for m in masks:
        h, w = m.shape[-2:]
        vh = (~m[:, :, 0]).sum(1).float() / h
        vw = (~m[:, 0, :]).sum(1).float() / w
        out.append(torch.stack([vw, vh], -1))
    return torch.stack(out, 1)


def encoder_reference_points(shapes: list[tuple[int, int]], ratios: torch.Tensor) -> torch.Tensor:
    """Pixel centres of every token, normalised to its image's unpadded extent and projected to every
    level: ``[B, S, L, 2]`` (x, y)."""
    device = ratios.device
    refs = []
    for lvl, (h, w) in enumerate(shapes):
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32) + 0.5,
                                torch.arange(w, device=device, dtype=torch.float32) + 0.5, indexing="ij")
        ry = ys.reshape(1, -1) / (ratios[:, None, lvl, 1] * h)  # [B, h*w]
        rx = xs.reshape(1, -1) / (ratios[:, None, lvl, 0] * w)
        refs.append(torch.stack([rx, ry], -1))
    ref = torch.cat(refs, 1)  # [B, S, 2]
    return ref[:, :, None] * ratios[:, None]  # [B, S, L, 2]


def encoder_proposals(memory_mask: torch.Tensor, shapes: list[tuple[int, int]], by_position: bool = False
                      ) -> torch.Tensor:
    """Per encoder token a box ``[B, S, 4]`` (cx, cy, w, h): its cell centre normalised by the image's
    unpadded extent on its level and a size growing 2x per coarser level (MaskDINO's proposal geometry).

    ``memory_mask [B, S]`` is the flattened padding mask of the levels ``shapes``; ``by_position``: the size
    grows with the level's position in ``shapes`` instead (DINO's code, whatever the order)."""
    order = list(range(len(shapes))) if by_position else sorted(range(len(shapes)), key=lambda i: -shapes[i][0] * shapes[i][1])
    rank = {lvl: r for r, lvl in enumerate(order)}
    out, start = [], 0
    bsz, dev = memory_mask.shape[0], memory_mask.device
    for lvl, (h, w) in enumerate(shapes):
        m = memory_mask[:, start:start + h * w].view(bsz, h, w)
        vh = (~m[:, :, 0]).sum(1).float().clamp(min=1)
        vw = (~m[:, 0, :]).sum(1).float().clamp(min=1)
        gy, gx = torch.meshgrid(torch.arange(h, device=dev, dtype=torch.float32),
                                torch.arange(w, device=dev, dtype=torch.float32), indexing="ij")
        xy = torch.stack([(gx + 0.5)[None] / vw[:, None, None], (gy + 0.5)[None] / vh[:, None, None]], -1)
        wh = torch.full_like(xy, 0.05 * 2.0 ** rank[lvl])
        out.append(torch.cat([xy, wh], -1).view(bsz, h * w, 4))
        start += h * w
    return torch.cat(out, 1).clamp(0.0, 1.0)
