"""Denoising queries (DN-DETR / MaskDINO): noised ground-truth labels and boxes the decoder must restore.

Groups = ``dn_num // max instances per image``, at least one: dense images keep denoising (with one
group, even beyond the ``dn_num`` budget) instead of silently turning it off.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from surgdino.log import get_logger
from surgdino.modeling.layers import inverse_sigmoid
from surgdino.modeling.layers.geometry import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh

_warned = False


@dataclass
class DNQueries:
    """Denoising inputs: ``labels`` content ``[B, G*M, D]``, ``boxes`` unsigmoided ``[B, G*M, 4]``,
    ``attn_mask [G*M + Q, G*M + Q]`` (True = blocked), ``num_groups`` G and ``group_size`` M."""

    content: torch.Tensor
    boxes_unsig: torch.Tensor
    attn_mask: torch.Tensor
    num_groups: int
    group_size: int

    @property
    def size(self) -> int:
        return self.num_groups * self.group_size


def num_dn_groups(max_instances: int, dn_num: int) -> int:
    """Groups of denoising queries: as many as fit ``dn_num``, at least one."""
    global _warned
    if max_instances > dn_num and not _warned:
        get_logger(__name__).info(
            "an image has %d instances, more than MODEL.MaskDINO.DN_NUM = %d: using one denoising group "
            "of %d queries (raise DN_NUM to keep the budget explicit)", max_instances, dn_num, max_instances)
        _warned = True
    return max(dn_num // max(max_instances, 1), 1)


def prepare_for_dn(targets: list[dict], *, dn_num: int, noise_scale: float, label_noise_ratio: float,
                   num_classes: int, label_enc: Callable[[torch.Tensor], torch.Tensor], num_queries: int,
                   device: torch.device | None = None) -> DNQueries | None:
    """Build noised queries from ``targets`` (``labels [N]``, ``boxes [N, 4]`` normalised cxcywh).

    ``label_enc`` maps (noised) labels ``[B, G*M]`` to content ``[B, G*M, D]``: an ``nn.Embedding`` (closed
    set; its device is the default ``device``) or GroundingDINO's projected phrase features.
    Returns None when no image has instances or ``dn_num`` is 0.
    """
    counts = [int(t["labels"].numel()) for t in targets]
    m = max(counts, default=0)
    if m == 0 or dn_num <= 0:
        return None
    g = num_dn_groups(m, dn_num)
    device = label_enc.weight.device if device is None else device
    bsz = len(targets)
    labels = torch.zeros(bsz, m, dtype=torch.int64, device=device)
    boxes = torch.zeros(bsz, m, 4, device=device)
    valid = torch.zeros(bsz, m, dtype=torch.bool, device=device)
    for i, (t, n) in enumerate(zip(targets, counts)):
        labels[i, :n] = t["labels"]
        boxes[i, :n] = t["boxes"].to(boxes.dtype)
        valid[i, :n] = True
    labels = labels.repeat(1, g)  # [B, G*M]
    boxes = boxes.repeat(1, g, 1)  # [B, G*M, 4]
    valid = valid.repeat(1, g)
    if label_noise_ratio > 0:
        flip = torch.rand(labels.shape, device=device) < label_noise_ratio
        labels = torch.where(flip, torch.randint_like(labels, num_classes), labels)
    if noise_scale > 0:
        xyxy = box_cxcywh_to_xyxy(boxes)
        half = boxes[..., 2:].repeat(1, 1, 2) / 2  # corners move up to half the size
        xyxy = xyxy + (torch.rand_like(xyxy) * 2 - 1) * half * noise_scale
        boxes = box_xyxy_to_cxcywh(xyxy.clamp(0.0, 1.0))
    content = label_enc(labels) * valid[..., None]  # [B, G*M, D]; padding slots are zeros
    boxes_unsig = inverse_sigmoid(boxes) * valid[..., None]  # [B, G*M, 4]
    size = g * m
    total = size + num_queries
    attn_mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    attn_mask[size:, :size] = True  # matching queries never see the answers
    group = torch.arange(size, device=device) // m
    attn_mask[:size, :size] = group[:, None] != group[None, :]  # groups are independent
    return DNQueries(content, boxes_unsig, attn_mask, g, m)
